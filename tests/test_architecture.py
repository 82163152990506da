"""The layout rules of the library, checked on its source: PyTorch behind one boundary, no import cycles,
inference independent of training, short files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fcn_jax"
TORCH_SUBPACKAGE = "fcn_jax.pytorch"
DOOR = "fcn_jax.extras"  # the one core module that reaches the torch subpackage
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text())


def _import_statements(name: str) -> set[str]:
    """The modules ``name`` imports, at its top or inside functions: ``import x`` gives x; ``from x import y``
    gives x.y where that is a module of the package, else x."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(MODULES)
            found.update(submodules if len(submodules) == len(node.names) else {base, *submodules})
    return found


def _door_calls(name: str) -> set[str]:
    """The torch-subpackage modules ``name`` opens with ``extras.pytorch("io", ...)``."""
    return {f"{TORCH_SUBPACKAGE}.{node.args[0].value}" for node in ast.walk(_tree(name))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "pytorch"
            and node.args and isinstance(node.args[0], ast.Constant)}


GRAPH = {name: {m for m in _import_statements(name) | _door_calls(name) if m in MODULES and m != name}
         for name in MODULES}
CORE = [n for n in MODULES if n != TORCH_SUBPACKAGE and not n.startswith(TORCH_SUBPACKAGE + ".")]


def test_only_the_torch_subpackage_imports_torch():
    offenders = [f"{n} imports {m}" for n in CORE for m in _import_statements(n)
                 if m.split(".")[0] in ("torch", "torchvision")]
    assert not offenders, offenders


def test_the_core_reaches_the_torch_subpackage_only_through_its_door():
    offenders = [f"{n} imports {m}" for n in CORE if n != DOOR for m in _import_statements(n)
                 if m.startswith(TORCH_SUBPACKAGE)]
    assert not offenders, offenders
    assert any(_door_calls(n) for n in CORE), "no module uses the door: this test would not see one"


def test_every_torch_subpackage_module_imports_torch_at_its_top():
    for name in MODULES:
        if name.startswith(TORCH_SUBPACKAGE + "."):
            top = _tree(name).body
            top_imports = {alias.name.split(".")[0] for node in top if isinstance(node, ast.Import)
                           for alias in node.names}
            top_imports |= {node.module.split(".")[0] for node in top
                            if isinstance(node, ast.ImportFrom) and node.module}
            assert top_imports & {"torch", "torchvision"}, f"{name} does not import torch at its top"


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


@pytest.mark.parametrize("module", ["fcn_jax.prediction", "fcn_jax.evaluation"])
def test_inference_does_not_depend_on_training(module):
    training = sorted(m for m in _reachable(module) if m.startswith("fcn_jax.training"))
    assert not training, f"{module} reaches {training}"


def test_no_library_file_is_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_command_lines_choices_are_what_the_library_implements():
    from fcn_jax import choices
    from fcn_jax.models import CFGS, MODELS
    from fcn_jax.training import losses, optim

    assert tuple(MODELS) == choices.ARCHS and tuple(CFGS) == choices.BACKBONES
    for name in choices.LOSSES:
        losses.get_loss(name)
    for name in choices.OPTIMIZERS:
        optim.make_optimizer(name, 0.1)
    for name in choices.SCHEDULES:
        optim.make_schedule(name, 0.1, total_steps=10, steps_per_epoch=5)


def test_the_packages_names_are_not_hidden_by_a_module_of_the_same_name():
    # fcn_jax loads its names lazily; a submodule named like one would replace it once imported
    import fcn_jax

    modules = {p.stem for p in PACKAGE.iterdir()}
    assert not modules & set(fcn_jax.__all__)
