"""Training: the configuration and presets, the compiled step, the loop, checkpoints, and stopping safely.

- :mod:`~fcn_jax.training.config`: ``TrainConfig``, the presets, the command line's options.
- :mod:`~fcn_jax.training.run`: ``train`` / ``resume``, the program behind ``fcn-jax train``.
- :mod:`~fcn_jax.training.step`: the compiled training step, a plain function.
- :mod:`~fcn_jax.training.losses`, :mod:`~fcn_jax.training.optim`: objectives, optimizers and schedules.
- :mod:`~fcn_jax.training.checkpoint`, :mod:`~fcn_jax.training.lock`, :mod:`~fcn_jax.training.stopping`:
  asynchronous checkpoints, one run per folder, SIGTERM/Ctrl-C.
- :mod:`~fcn_jax.training.meter`, :mod:`~fcn_jax.training.reporting`: the loss kept on the devices, the logs.
"""
