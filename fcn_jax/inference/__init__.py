"""Using trained weights: metrics over a dataset, predictions on images, the heatmap pictures.

- :mod:`~fcn_jax.inference.evaluation`: ``fcn-jax evaluate`` (the confusion matrix over whole images).
- :mod:`~fcn_jax.inference.prediction`: ``fcn_jax.predict`` and ``fcn-jax predict``.
- :mod:`~fcn_jax.inference.heatmaps`: ``fcn-jax heatmap``.
- :mod:`~fcn_jax.inference.metrics`: pixel accuracy, mean IoU and the rest, from a confusion matrix.
- :mod:`~fcn_jax.inference.runs`: what inference reads of a training run's folder.
- :mod:`~fcn_jax.inference.drawing`: masks, overlays, legends, learning curves.

Nothing here depends on :mod:`fcn_jax.training` (tests/test_architecture.py checks it).
"""
