"""The layout rules of the library, checked on its source: PyTorch behind one boundary, no import cycles,
inference independent of training, short files."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcn_jax.errors import ConfigError, WeightsError
from fcn_jax.models import Segmenter
from fcn_jax.models.layers import Conv2d

PACKAGE = Path(__file__).resolve().parents[1] / "fcn_jax"
TORCH_SUBPACKAGE = "fcn_jax.pytorch"
DOOR = "fcn_jax.extras"  # the one core module that reaches the torch subpackage
MAX_LINES = 400
MAX_FUNCTION_LINES = 80


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


@pytest.mark.parametrize("package,must_not_reach", [("fcn_jax.inference", "fcn_jax.training"),
                                                    ("fcn_jax.models", "fcn_jax.weights"),
                                                    ("fcn_jax.data", "fcn_jax.models")])
def test_a_package_does_not_depend_on_a_later_one(package, must_not_reach):
    modules = [m for m in MODULES if m == package or m.startswith(package + ".")]
    reached = sorted({f"{m} -> {r}" for m in modules for r in _reachable(m) if r.startswith(must_not_reach)})
    assert modules and not reached, reached


def test_no_library_file_is_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_library_function_is_over_80_lines():
    long = {f"{name}.{node.name}": node.end_lineno - node.lineno + 1 for name in MODULES
            for node in ast.walk(_tree(name)) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}
    assert not long, long


def test_the_command_lines_choices_are_what_the_library_implements():
    from fcn_jax import choices, registry
    from fcn_jax.models import CFGS, MODELS
    from fcn_jax.training import losses, optim

    assert tuple(MODELS) == registry.archs() and tuple(CFGS) == registry.family_of("fcn8s").backbones
    for arch in registry.archs():
        assert MODELS[arch].arch == arch and MODELS[arch].family == registry.family_of(arch).name
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


# --- a family added with no edit anywhere else: one models class, one torch layout, one registry entry ----------


class _TinyBackbone(nnx.Module):
    def __init__(self, width: int, *, dtype, param_dtype, precision, rngs: nnx.Rngs):
        self.name, self.batch_norm = "tiny", False
        self.conv = Conv2d(3, width, 3, padding=1, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)


class _TinySegmenter(Segmenter):
    """A 3x3 convolution, ReLU and a 1x1 classifier: logits at the input's size."""

    arch, family = "tiny", "tiny_family"

    def __init__(self, num_classes: int, *, backbone: str = "tiny", batch_norm: bool = False, width: int = 4,
                 dtype=jnp.float32, param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.num_classes, self.width = num_classes, width
        self.backbone = _TinyBackbone(width, **kw)
        self.head = Conv2d(width, num_classes, 1, **kw)

    def config(self) -> dict:
        return {**super().config(), "width": self.width}

    def __call__(self, images):
        return self.head(jax.nn.relu(self.backbone.conv(images)))


class _TinyLayout:
    """The family's torch layout: ``features.conv.*`` and ``head.*``."""

    @staticmethod
    def layer_table(model):
        from fcn_jax.weights.torch_layout import Layer

        return [Layer("features.conv", ("backbone", "conv"), "conv"), Layer("head", ("head",), "conv")]

    @staticmethod
    def recognize(sd):
        if "head.weight" not in sd:
            return None
        return {"layout": "tiny", "backbone": "tiny", "batch_norm": False, "num_classes": sd["head.weight"].shape[0]}

    @staticmethod
    def adapt(model, sd, found):
        if found["layout"] != "tiny":
            raise WeightsError(f"not a tiny state_dict ({found['layout']})")
        return sd, [], [], None


@pytest.fixture
def tiny_family():
    from fcn_jax import registry

    registry.register(registry.Family("tiny_family", "a family defined in a test", {"tiny": _TinySegmenter},
                                      ("tiny",), _TinyLayout))
    yield
    registry.unregister("tiny_family")


@pytest.mark.slow
def test_a_family_registered_in_a_test_goes_through_every_path(tiny_family, tmp_path, capsys):
    import fcn_jax
    from fcn_jax.cli import main
    from fcn_jax.deploy.exporting import export, verify
    from fcn_jax.inference.evaluation import evaluate_model
    from tests.helpers import TinyDataset

    model = fcn_jax.create_model("tiny", num_classes=3, backbone="tiny", width=5, seed=0)
    images = jax.random.normal(jax.random.key(0), (2, 9, 11, 3))
    assert isinstance(model, _TinySegmenter) and model(images).shape == (2, 9, 11, 3)

    sd = fcn_jax.to_torch_state_dict(model)  # torch layout both ways
    assert sorted(sd) == ["features.conv.bias", "features.conv.weight", "head.bias", "head.weight"]
    assert sd["features.conv.weight"].shape == (5, 3, 3, 3)
    twin = fcn_jax.create_model("tiny", num_classes=3, backbone="tiny", width=5, seed=1)
    fcn_jax.load_torch_state_dict(twin, sd)
    np.testing.assert_array_equal(twin(images), model(images))
    with pytest.raises(WeightsError, match=r"head.weight: expected \(3, 5, 1, 1\)"):
        fcn_jax.load_torch_state_dict(twin, {**sd, "head.weight": np.zeros((3, 4, 1, 1), np.float32)})

    path = fcn_jax.save_weights(model, tmp_path / "tiny.safetensors")  # native format: its config travels along
    loaded = fcn_jax.load_model(path)
    assert loaded.width == 5
    np.testing.assert_array_equal(loaded(images), model(images))

    metrics, _ = evaluate_model(loaded, TinyDataset(n=4, size=8), normalization="imagenet")
    assert 0 <= metrics["mean_iou"] <= 1
    data = export(loaded, "stablehlo")
    assert all(c.ok for c in verify(loaded, data, "stablehlo", shapes=[(2, 32, 64)]))
    with pytest.raises(ConfigError, match=r"ONNX export covers the .* families, not tiny_family"):
        pytest.importorskip("onnx")
        export(loaded, "onnx")

    # the command line offers it, and its commands take it
    assert main(["summary", "--arch", "tiny", "--backbone", "tiny", "--num-classes", "3"]) == 0
    assert "_TinySegmenter" in capsys.readouterr().out
    assert main(["train", "--arch", "tiny", "--backbone", "tiny", "--no-batch-norm", "--synthetic-size", "16",
                 "--synthetic-train", "32", "--synthetic-val", "8", "--epochs", "1", "--workers", "0",
                 "--overlays", "1", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["export", str(tmp_path / "run" / "final.safetensors"), "--format", "stablehlo", "--output",
                 str(tmp_path / "tiny.jaxexport")]) == 0
