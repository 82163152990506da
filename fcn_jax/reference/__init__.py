"""The PyTorch FCN that fcn-jax mirrors (needs the ``torch`` extra: ``pip install fcn-jax[torch]``).

Our own implementation of ``shared/spec/FCN_REFERENCE.md``: a VGG backbone subclassing torchvision's
``VGG`` and the FCN32s/FCN16s/FCN8s/FCNs decoders, NCHW, with the reference's state_dict layout.
The tests and ``fcn-jax compare`` check the JAX models against it.
"""

try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fcn_jax.reference needs PyTorch and torchvision: pip install 'fcn-jax[torch]'") from e

from fcn_jax.reference.torch_fcn import (FCN8s, FCN16s, FCN32s, FCNs, TORCH_MODELS, VGGNet,
                                         build_torch_model, randomize_batchnorm_)

__all__ = ["FCN8s", "FCN16s", "FCN32s", "FCNs", "TORCH_MODELS", "VGGNet", "build_torch_model",
           "randomize_batchnorm_"]
