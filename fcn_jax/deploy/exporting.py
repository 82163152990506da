"""Exporting a model for deployment, and checking the exported file in its own runtime.

Two formats (:data:`fcn_jax.choices.EXPORT_FORMATS`):

- ``onnx``: a graph of ONNX operators written from the model's layers (:mod:`fcn_jax.deploy.onnx_graph`), run by
  onnxruntime and any ONNX runtime; NCHW float input, batch, height and width all dynamic. Needs the ``onnx``
  extra.
- ``stablehlo``: the model compiled by :func:`jax.export.export` and serialised (weights included); any JAX
  reloads it with ``jax.export.deserialize(data).call(images)``, without fcn-jax. NHWC input, like the models.
  The batch is symbolic; height and width are symbolic in steps of 32 (``32*h``, ``32*w``: JAX's shape rules
  cannot decide the size comparisons inside the networks for arbitrary sizes), or fixed with ``size``.
  Lowered for CPU, CUDA and TPU.

With ``with_preprocessing`` either takes uint8 RGB images ``(N, H, W, 3)`` and returns int class ids ``(N, H,
W)`` (and softmax scores with ``scores``), normalising inside through the exact table training uses.

:func:`verify` runs an exported file in its runtime on random batches and measures it against the JAX model;
:func:`export_file` (``fcn-jax export``) writes, verifies and reports.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcn_jax import extras
from fcn_jax.atomic_files import atomic_target, refuse_overwriting
from fcn_jax.choices import EXPORT_FORMATS, NORMALIZATIONS
from fcn_jax.data.normalization import normalize, normalize_on_device
from fcn_jax.errors import ConfigError, InputError
from fcn_jax.inference.runs import input_normalization
from fcn_jax.models import Segmenter, compiled_forward
from fcn_jax.models.modes import in_mode
from fcn_jax.notes import note

TOLERANCE = 1e-5  # max |exported - JAX| / max |JAX| of float32 logits (or scores)
PLATFORMS = ("cpu", "cuda", "tpu")
SIZE_STEP = 32  # StableHLO's symbolic height and width


def export(model, format: str = "stablehlo", *, with_preprocessing: bool = False, normalization: str = "imagenet",
           scores: bool = False, size: tuple[int, int] | None = None) -> bytes:
    """The exported ``model`` (any fcn-jax segmentation net or the heatmap, in eval mode) as bytes to write to a
    file; see the module doc for the formats. ``size``: a fixed ``(H, W)`` for StableHLO (ONNX is always
    dynamic)."""
    _check(model, format, normalization, size, scores and not with_preprocessing)
    if format == "onnx":
        if size is not None:
            raise ConfigError("ONNX exports take any height and width; --size is for StableHLO")
        with in_mode(model, train=False):
            proto = extras.onnx("ONNX export").onnx_model(model, with_preprocessing=with_preprocessing,
                                                          normalization=normalization, scores=scores)
        return proto.SerializeToString()
    return _stablehlo(model, with_preprocessing, normalization, scores, size).serialize()


def _check(model, format: str, normalization: str, size, scores_without_preprocessing: bool) -> None:
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if not isinstance(model, Segmenter):
        raise ConfigError(f"export takes a whole network (any registered architecture), got {type(model).__name__}")
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if scores_without_preprocessing:
        raise ConfigError("--scores adds softmax scores to a --with-preprocessing export (plain exports return "
                          "the logits)")
    if size is not None and min(size) < model.min_size:
        raise ConfigError(f"--size {size[0]}x{size[1]} is too small: {model.arch} takes at least "
                          f"{model.min_size}x{model.min_size}")


def _stablehlo(model, with_preprocessing: bool, normalization: str, scores: bool, size) -> jax.export.Exported:
    model = nnx.clone(model)
    model.eval()
    graphdef, state = nnx.split(model)

    def run(images):
        net = nnx.merge(graphdef, state)
        if not with_preprocessing:
            return net(images)
        logits = net(normalize_on_device(images, normalization))
        classes = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (classes, jax.nn.softmax(logits, axis=-1)) if scores else classes

    if size is None:
        batch, height, width = jax.export.symbolic_shape(f"b, {SIZE_STEP}*h, {SIZE_STEP}*w")
    else:
        (batch,), (height, width) = jax.export.symbolic_shape("b"), size
    spec = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8 if with_preprocessing else jnp.float32)
    return jax.export.export(jax.jit(run), platforms=PLATFORMS)(spec)


# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verification:
    """One verified batch: ``relative`` = max |exported - JAX| / max |JAX| of the logits (with preprocessing: of
    the scores, divided by the largest logit instead), ``mismatched`` class ids at pixels whose two best JAX
    logits are further apart than the tolerance (preprocessing only)."""
    shape: tuple[int, ...]
    relative: float | None
    mismatched: int | None = None
    pixels: int = 0

    @property
    def ok(self) -> bool:
        return (self.relative is None or self.relative <= TOLERANCE) and not self.mismatched

    def describe(self) -> str:
        parts = [f"batch {'x'.join(map(str, self.shape))}"]
        if self.relative is not None:
            parts.append(f"max relative difference {self.relative:.2e} (tolerance {TOLERANCE:.0e})")
        if self.mismatched is not None:
            parts.append(f"class ids: {self.mismatched} of {self.pixels} pixels differ beyond near-ties")
        return ", ".join(parts) + ("" if self.ok else "  OVER TOLERANCE")


def default_verify_sizes(model, format: str, size: tuple[int, int] | None) -> list[tuple[int, int, int]]:
    """``(batch, H, W)`` of the two verification batches: two sizes the export takes (two batch sizes where
    the size is fixed)."""
    if size is not None:
        return [(1, *size), (2, *size)]
    if model.min_size > 1:
        return [(2, model.min_size, model.min_size), (1, model.min_size + 32, model.min_size + 64)]
    return [(2, 64, 96), (1, 37, 45)] if format == "onnx" else [(2, 64, 96), (1, 96, 32)]


def verify(model, data: bytes, format: str, *, with_preprocessing: bool = False, normalization: str = "imagenet",
           scores: bool = False, shapes: list[tuple[int, int, int]] | None = None,
           seed: int = 0) -> list[Verification]:
    """Run the exported ``data`` in its own runtime (onnxruntime / deserialised JAX) on random batches of
    ``shapes`` ``(N, H, W)`` and measure it against ``model`` in eval mode at the highest matmul precision."""
    run = _onnx_runner(data) if format == "onnx" else _stablehlo_runner(data)
    rng = np.random.default_rng(seed)
    results = []
    for n, h, w in shapes:
        if with_preprocessing:
            pixels = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
            logits = _jax_logits(model, normalize(pixels, normalization))
            outputs = run(pixels)
            top2 = np.sort(logits, axis=-1)[..., -2:] if logits.shape[-1] > 1 else None
            clear = (top2[..., 1] - top2[..., 0] > TOLERANCE * np.abs(logits).max()) if top2 is not None else True
            mismatched = int(((outputs[0] != logits.argmax(-1)) & clear).sum())
            relative = None
            if scores:  # a softmax moves by at most the largest change of its inputs: judged on the logits' scale
                probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
                relative = _relative(outputs[1], probs, scale=np.abs(logits).max())  # NHWC in both formats
            results.append(Verification((n, h, w, 3), relative, mismatched, int(np.prod(logits.shape[:3]))))
        else:
            images = rng.standard_normal((n, h, w, 3)).astype(np.float32)
            logits = _jax_logits(model, images)
            results.append(Verification((n, h, w, 3), _relative(_nhwc(run(images)[0], format), logits)))
    return results


def _jax_logits(model, images: np.ndarray) -> np.ndarray:
    with in_mode(model, train=False), jax.default_matmul_precision("highest"):
        return np.asarray(compiled_forward(model, jnp.asarray(images)))


def _relative(ours: np.ndarray, reference: np.ndarray, scale: float | None = None) -> float:
    if ours.shape != reference.shape:
        return float("inf")
    scale = np.abs(reference).max() if scale is None else scale
    return float(np.abs(ours.astype(np.float64) - reference).max() / max(scale, 1e-30))


def _nhwc(x: np.ndarray, format: str) -> np.ndarray:
    return x.transpose(0, 2, 3, 1) if format == "onnx" and x.ndim == 4 else x


def _onnx_runner(data: bytes):
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x if x.dtype == np.uint8 else x.transpose(0, 3, 1, 2)})


def _stablehlo_runner(data: bytes):
    exported = jax.export.deserialize(bytearray(data))

    def run(x):
        with jax.default_matmul_precision("highest"):
            out = exported.call(x)
        return [np.asarray(o) for o in (out if isinstance(out, tuple) else (out,))]

    return run


# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    path: Path
    format: str
    bytes: int
    normalization: str | None
    checks: list[Verification]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def export_file(weights: str | os.PathLike, *, format: str, output: str | os.PathLike,
                with_preprocessing: bool = False, scores: bool = False, normalization: str | None = None,
                size: tuple[int, int] | None = None, check: bool = True, progress=print) -> ExportResult:
    """``fcn-jax export``: load an fcn-jax weights file, export it to ``output``, verify it (unless ``check``
    is False) and report through ``progress``. ``normalization`` (for ``with_preprocessing``): by default the
    one stored in the weights file, else ``imagenet``, said in the report."""
    from fcn_jax.weights.native import load_model, read_weights_config

    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name, e.g. {output / ('model.' + format)}")
    refuse_overwriting([("--output", output)], [("the weights", weights)])
    if format == "onnx":
        extras.onnx("ONNX export")  # before loading the weights: the missing extra is the first thing to say
    config = read_weights_config(weights)
    if config.get("model") != "fcn":
        raise InputError(f"{weights} holds a bare VGG backbone; export takes a whole network (an FCN, a paper FCN "
                         f"or the heatmap)")
    if with_preprocessing and normalization is None and "normalization" not in config:
        note(f"{weights} does not say how its images were normalised; the graph normalises as "
                 f"'imagenet' (give --normalization if the model was trained otherwise)")
    normalization = input_normalization(normalization, None, config)
    model = load_model(weights)
    data = export(model, format, with_preprocessing=with_preprocessing, normalization=normalization, scores=scores,
                  size=size)
    with atomic_target(output) as tmp:
        tmp.write_bytes(data)
    progress(f"wrote {output} ({format}, {len(data) / 2**20:.1f} MiB, {model.arch}-{model.backbone.name}"
             + (f", uint8 RGB in, class ids out, normalisation {normalization}" if with_preprocessing else "") + ")")
    checks = []
    if check:
        checks = verify(model, output.read_bytes(), format, with_preprocessing=with_preprocessing,  # as written
                        normalization=normalization, scores=scores,
                        shapes=default_verify_sizes(model, format, size))
        for c in checks:
            progress(f"verified in {'onnxruntime' if format == 'onnx' else 'deserialised JAX'}: {c.describe()}")
    return ExportResult(output, format, len(data), normalization if with_preprocessing else None, checks)


__all__ = ["PLATFORMS", "TOLERANCE", "ExportResult", "Verification", "export", "export_file", "verify"]
