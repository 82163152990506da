"""Everything in fcn-jax that needs PyTorch: the ``torch`` extra (``pip install 'fcn-jax[torch]'``).

This subpackage is the only part of ``fcn_jax`` that imports torch or torchvision; every module in it
imports torch at its top. The core reaches it through :mod:`fcn_jax.extras` where a user hands it
something only PyTorch can read (a ``.pth`` file, torch tensors) or asks for a PyTorch-side job.

- :mod:`~fcn_jax.pytorch.io`: ``.pth`` files (``torch.load(weights_only=True)``) and tensors <-> numpy.
- :mod:`~fcn_jax.pytorch.reference`: the PyTorch FCN that fcn-jax mirrors (NCHW, its state_dict layout).
- :mod:`~fcn_jax.pytorch.hub`: torchvision's ImageNet VGG weights.
- :mod:`~fcn_jax.pytorch.parity`: the PyTorch twin of a JAX model and how far apart the two are.
- :mod:`~fcn_jax.pytorch.speed`: JAX and PyTorch timed side by side (time, memory, page faults).
- :mod:`~fcn_jax.pytorch.compare`: ``fcn-jax compare``.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fcn_jax.pytorch needs PyTorch: pip install 'fcn-jax[torch]'") from e
