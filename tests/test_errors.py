"""The error contract: "your input is wrong" is an FcnJaxError (one line, exit 2); anything else is a bug
and keeps its traceback (exit 1)."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import fcn_jax.errors as errors
from fcn_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
# What library code may raise besides FcnJaxError subclasses: misuse of the Python API by code (TypeError), the
# sequence and mapping protocols (IndexError; KeyError from fcn_jax.models.MODELS[arch]), abstract methods,
# internal consistency checks, argparse's own bad-value error (argparse prints it and exits 2) and ImportError
# from importing fcn_jax.pytorch without torch. AttributeError: what a module-level __getattr__ must raise for an
# unknown name (fcn_jax/__init__.py)
ALLOWED = {"TypeError", "IndexError", "KeyError", "NotImplementedError", "AssertionError", "ArgumentTypeError",
           "ImportError", "AttributeError"}


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_every_input_error_is_defined_in_errors_py():
    for path in (ROOT / "fcn_jax").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        importlib.import_module(name)
    outside = [f"{c.__module__}.{c.__name__}" for c in _all_subclasses(errors.FcnJaxError)
               if c.__module__ != "fcn_jax.errors" and c.__module__.startswith("fcn_jax")]
    assert not outside, outside
    defined = {name for name, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, errors.FcnJaxError)}
    assert {"FcnJaxError", "ConfigError", "WeightsError", "DatasetError", "TrainingDiverged"} <= defined


def test_the_library_raises_no_other_error_kind():
    found = []
    for path in sorted((ROOT / "fcn_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = getattr(call, "id", getattr(call, "attr", None))
                if name and name[0].isupper() and name.endswith("Error") and name not in ALLOWED \
                        and not issubclass(getattr(errors, name, Exception), errors.FcnJaxError):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} raises {name}")
    assert not found, found


def test_input_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["summary", "--weights", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err == f"fcn-jax: error: no such weights file: {tmp_path / 'missing.safetensors'}\n"


def test_a_bug_is_not_reported_as_bad_input(monkeypatch):
    """A ValueError from deep inside (what a JAX shape error is) propagates instead of exiting 2."""
    def broken(model):
        raise ValueError("Incompatible shapes for broadcasting: (2, 3) and (4,)")

    monkeypatch.setattr(importlib.import_module("fcn_jax.models.summary"), "summary", broken)
    with pytest.raises(ValueError, match="Incompatible shapes"):
        main(["summary", "--arch", "fcn32s"])


@pytest.mark.slow
def test_a_bug_keeps_its_traceback_and_exits_1():
    code = ("import importlib, sys\n"
            "s = importlib.import_module('fcn_jax.models.summary')\n"
            "def broken(model): raise ValueError('Incompatible shapes for broadcasting')\n"
            "s.summary = broken\n"
            "from fcn_jax.cli import main\n"
            "sys.exit(main(['summary', '--arch', 'fcn32s']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "in broken" in result.stderr
    assert "fcn-jax: error" not in result.stderr
