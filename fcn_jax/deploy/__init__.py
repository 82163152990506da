"""Deployment: a model exported as ONNX or serialized StableHLO, then checked in its own runtime.

- :mod:`~fcn_jax.deploy.exporting`: ``fcn_jax.export`` and ``fcn-jax export`` (writing and verifying).
- :mod:`~fcn_jax.deploy.onnx_graph`: the ONNX graph written layer by layer (the ``onnx`` extra).
"""
