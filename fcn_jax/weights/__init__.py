"""Weights: fcn-jax's own file format and PyTorch's layouts, both ways, exactly.

- :mod:`~fcn_jax.weights.native`: ``.safetensors`` in the Flax layout with the model's config as metadata
  (``save_weights``, ``load_model``, ``load_weights``, staged ``load_matching``); reading needs no PyTorch.
- :mod:`~fcn_jax.weights.torch_layout`: the torch-key -> Flax-path tables (one transform per layer kind), reading
  torch state_dicts once, the one key check (missing, unexpected, mis-shaped) before any copy.
- :mod:`~fcn_jax.weights.convert`: the ``fcn-jax convert`` job (PyTorch <-> fcn-jax, optionally verified).
"""
