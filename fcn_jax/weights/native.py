"""fcn-jax's own weights format: safetensors in the Flax layout, with the model's config as metadata.

Keys are Flax variable paths joined with dots (``backbone.convs.0.kernel``, ``bn1.mean``); the
metadata records ``format``, ``model`` ("fcn" or "vgg" for a bare backbone), ``arch``,
``backbone``, ``batch_norm`` and ``num_classes``, so :func:`load_model` rebuilds the right model.
Reading needs neither PyTorch nor pickle. Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcn_jax.atomic_files import atomic_target
from fcn_jax.devices import host_array
from fcn_jax.errors import WeightsError, check_keys, check_values
from fcn_jax.models import Segmenter, VGGBackbone, create_backbone, create_model

FORMAT = "fcn-jax/1"
NOT_ARCHITECTURE = ("model", "normalization", "class_names", "palette")  # metadata beside the model's config


def model_config(model: Segmenter | VGGBackbone) -> dict:
    """The constructor arguments that rebuild ``model``'s architecture."""
    if isinstance(model, Segmenter):
        return {"model": "fcn", **model.config()}
    if hasattr(model, "kind"):  # a bare backbone: VGGBackbone, ResNetBackbone
        return {"model": model.kind, "backbone": model.name, "batch_norm": model.batch_norm}
    raise TypeError(f"expected an fcn_jax network or backbone, got {type(model).__name__}")


def flat_variables(model) -> dict[str, nnx.Variable]:
    """``{"backbone.convs.0.kernel": variable, ...}``: every parameter and BatchNorm statistic."""
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model))}


def save_weights(model: Segmenter | VGGBackbone, path: str | os.PathLike, *, class_names=None, palette=None,
                 normalization: str | None = None) -> Path:
    """Write ``model``'s parameters and BatchNorm statistics to a ``.safetensors`` file; optionally
    the dataset's class names and colours, which ``fcn-jax predict`` uses for its pictures, and the input
    normalisation the weights expect (``fcn-jax export --with-preprocessing`` builds it into the graph)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"weights are saved as .safetensors, got {path.name!r}")
    config = model_config(model)
    meta = {"format": FORMAT, **{k: str(v) for k, v in config.items()}, "config": json.dumps(config)}
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
    if palette is not None:
        meta["palette"] = json.dumps(np.asarray(palette).astype(int).tolist())
    if normalization is not None:
        meta["normalization"] = normalization
    tensors = {k: host_array(v[...]) for k, v in flat_variables(model).items()}
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_safetensors(path: str | os.PathLike, with_tensors: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """``(metadata, tensors)`` of any ``.safetensors`` file (fcn-jax's or a torch-layout one); a missing,
    truncated or foreign file (a ``.pth`` given by mistake) is a WeightsError that says what to do."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no such weights file: {path}")
    try:
        with safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}  # noqa: SIM118
    except SafetensorError as e:
        if _is_torch_file(path):
            raise WeightsError(f"{path} is a PyTorch file, not fcn-jax weights: convert it first with `fcn-jax "
                               f"convert --input {path} --arch ARCH --output {path.stem}.safetensors`") from e
        raise WeightsError(f"could not read {path} as safetensors ({e}); the file is truncated or not a "
                           f"safetensors file: save, convert or download it again") from e
    return meta, tensors


def _read(path: str | os.PathLike, with_tensors: bool) -> tuple[dict, dict[str, np.ndarray]]:
    meta, tensors = read_safetensors(path, with_tensors)
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path} is not an fcn-jax weights file (metadata format {meta.get('format')!r}, "
                           f"expected {FORMAT!r}); for PyTorch weights use fcn_jax.load_torch_state_dict or "
                           f"`fcn-jax convert`")
    config = {"model": meta.get("model", "fcn"), "backbone": meta.get("backbone"),
              "batch_norm": meta.get("batch_norm") == "True"}
    damaged = "the file was edited or damaged: save or convert the weights again"
    if config["model"] == "fcn" and "config" in meta:  # the model's whole config (files since 0.1.0's families)
        try:
            config.update(json.loads(meta["config"]))
        except json.JSONDecodeError as e:
            raise WeightsError(f"{path}: its metadata 'config' is not JSON ({e}); {damaged}") from None
    elif config["model"] == "fcn":
        try:
            config.update(arch=meta.get("arch"), num_classes=int(meta.get("num_classes", 0)))
        except ValueError:
            raise WeightsError(f"{path}: its metadata 'num_classes' is {meta['num_classes']!r}, not a number; "
                               f"{damaged}") from None
    if "normalization" in meta:
        config["normalization"] = meta["normalization"]
    for key in ("class_names", "palette"):
        if key in meta:
            try:
                config[key] = json.loads(meta[key])
            except json.JSONDecodeError as e:
                raise WeightsError(f"{path}: its metadata {key!r} is not JSON ({e}); {damaged}") from None
    return config, tensors


def _is_torch_file(path: Path) -> bool:
    """What ``torch.save`` writes: a zip archive (since PyTorch 1.6) or, before that, a pickle."""
    with path.open("rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or head[:1] == b"\x80"


def read_weights(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, tensors)`` of an fcn-jax weights file, with clear errors for anything else."""
    return _read(path, with_tensors=True)


def read_weights_config(path: str | os.PathLike) -> dict:
    """The config (and class names / palette, if saved) of an fcn-jax weights file, from its header only."""
    return _read(path, with_tensors=False)[0]


def load_weights(model: Segmenter | VGGBackbone, path: str | os.PathLike) -> dict:
    """Copy an fcn-jax weights file into ``model`` in place; returns the file's config.

    A backbone loads from a backbone file or from the backbone part of a whole-FCN file. Nothing is
    written unless every variable is present with the right shape."""
    config, tensors = read_weights(path)
    _copy_into(model, config, tensors, path)
    return config


def _copy_into(model, config: dict, tensors: dict, path) -> None:
    if not isinstance(model, Segmenter) and config["model"] == "fcn":
        tensors = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    elif isinstance(model, Segmenter) and config["model"] != "fcn":
        raise WeightsError(f"{path} holds a bare {config['backbone']} backbone: load it with "
                           f"fcn_jax.load_weights(model.backbone, path)")
    want = flat_variables(model)
    mine = model_config(model)
    hints = [f"the file was saved from a model with {key}={config[key]!r}, this model has {mine[key]!r}"
             for key in ("backbone", "batch_norm", "num_classes") if key in mine and key in config
             and config[key] != mine[key]]
    check_keys(model.describe(), {k: v.shape for k, v in want.items()}, {k: v.shape for k, v in tensors.items()},
               hints)
    check_values(path, {k: (tensors[k], jnp.issubdtype(var.dtype, jnp.floating)) for k, var in want.items()})
    for k, var in want.items():
        var.set_value(jnp.asarray(tensors[k], dtype=var.dtype))


def load_matching(model, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Staged initialisation: copy every variable of the file whose name and shape match one of ``model``'s
    (e.g. FCN-16s from a trained FCN-32s, or a paper net's trunk from a ``heatmap`` file); returns ``(copied,
    left)``, the names copied and those left at their initial values. A file with nothing in common is an
    error."""
    config, tensors = read_weights(path)
    want = flat_variables(model)
    copied = [k for k, var in want.items() if k in tensors and tensors[k].shape == var.shape]
    if not copied:
        raise WeightsError(f"{path} ({config.get('arch') or config['model']}, {config['backbone']}) has no variable of "
                           f"the same name and shape as {model.describe()}'s")
    check_values(path, {k: (tensors[k], jnp.issubdtype(want[k].dtype, jnp.floating)) for k in copied})
    for k in copied:
        want[k].set_value(jnp.asarray(tensors[k], dtype=want[k].dtype))
    return copied, [k for k in want if k not in copied]


def load_model(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
               precision=None) -> Segmenter | VGGBackbone:
    """Rebuild the model saved by :func:`save_weights` (architecture from the file's metadata).

    Returns it in eval mode, ready for inference; call ``model.train()`` to fine-tune."""
    config, tensors = read_weights(path)
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, precision=precision)

    def architecture():
        if config["model"] != "fcn":
            return create_backbone(config["backbone"], batch_norm=config["batch_norm"], **kwargs)
        return create_model(**{k: v for k, v in config.items() if k not in NOT_ARCHITECTURE}, **kwargs)

    # Shapes only (no random initialisation, which for VGG16 takes seconds); every variable comes from the file.
    model = nnx.eval_shape(architecture)
    _copy_into(model, config, tensors, path)
    model.eval()
    return model
