"""The option names the command line offers besides the architectures (those come from :mod:`fcn_jax.registry`),
importable without JAX, so that ``fcn-jax --help`` and the spawned data-loading workers (which import the main
script again) start in a fraction of a second. tests/test_architecture.py checks that the library implements
each of them.
"""

LOSSES = ("cross_entropy", "cross_entropy_sum", "bce")
OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("constant", "step", "poly", "cosine")
NORMALIZATIONS = ("imagenet", "reference", "caffe")
EXPORT_FORMATS = ("onnx", "stablehlo")
