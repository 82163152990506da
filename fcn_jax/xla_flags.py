"""One XLA flag that makes fcn-jax's CPU training faster and more accurate, and the call that sets it.

On CPU, jaxlib 0.10 hands convolutions to YNNPACK. For the weight gradient of a convolution (a
convolution whose "batch" is the input channels and whose window is the whole image) YNNPACK was
both slower and less accurate than XLA's Eigen path on this project's models (FCN8s-VGG16, batch 2,
224x224, 2-core AVX-512 CPU: backbone weight gradients 272 -> 155 ms; float32 error of a 224x224
weight gradient against float64 8e-6 -> 7e-7 relative). Forward and input-gradient convolutions
are about as fast either way. :func:`use_fast_cpu_convolutions` adds

    --xla_cpu_experimental_ynn_fusion_type=-individual_convolution

to ``XLA_FLAGS``. The ``fcn-jax`` command calls it first thing; ``import fcn_jax`` does not, so a
program that imports the library keeps its environment as it was. Call it yourself, before your
first JAX computation, to train from Python as fast as the command does. It does nothing where:

- ``FCN_JAX_XLA_DEFAULTS=0`` is set;
- ``XLA_FLAGS`` already mentions ``xla_cpu_experimental_ynn_fusion_type`` (yours wins);
- jaxlib is not a 0.10.x release (XLA aborts on unknown flags, and the flag is experimental);
- JAX's backends already started (the flag would no longer be read; a warning says so).

The flag only affects XLA's CPU backend; GPU and TPU programs are unchanged. It is for float32 and bfloat16:
float64 convolutions become much slower with it (the gradient of a 3x3, 64-channel convolution on a 230x230
map: 0.44 -> 3.6 s; a float64 gradient of FCN16s-paper-VGG11 at 21x26: 0.6 -> 48 s), so ``fcn-jax compare
--float64`` leaves it unset, and float64 work from Python should not call it.
"""

from __future__ import annotations

import os

from fcn_jax.notes import warn

CPU_CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
TESTED_JAXLIB = (0, 10)  # major, minor releases the flag is known to exist in


def use_fast_cpu_convolutions() -> bool:
    """Add :data:`CPU_CONVOLUTION_FLAG` to ``XLA_FLAGS`` where the module docstring allows it; True if added."""
    import jaxlib

    flags = os.environ.get("XLA_FLAGS", "")
    version = tuple(int(p) for p in jaxlib.__version__.split(".")[:2])
    if (os.environ.get("FCN_JAX_XLA_DEFAULTS", "1") == "0" or "xla_cpu_experimental_ynn_fusion_type" in flags
            or version != TESTED_JAXLIB):
        return False
    if _backends_started():
        warn("JAX's backends already started: %s is not applied; call "
                    "fcn_jax.use_fast_cpu_convolutions() before the first JAX computation", CPU_CONVOLUTION_FLAG)
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_CONVOLUTION_FLAG}".strip()
    return True


def _backends_started() -> bool:
    """Whether JAX has created its backends (after which XLA_FLAGS is no longer read). JAX has no public
    query for this; where its private one moves, assume it has not."""
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # pragma: no cover - depends on the JAX release
        return False
    return backends_are_initialized()
