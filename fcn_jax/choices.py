"""The names the command line offers, importable without JAX, so that ``fcn-jax --help`` and the spawned
data-loading workers (which import the main script again) start in a fraction of a second. The modules
that implement them are keyed by these names; tests/test_architecture.py checks that they agree.
"""

ARCHS = ("fcn32s", "fcn16s", "fcn8s", "fcns",  # the tutorial's
         "fcn32s_paper", "fcn16s_paper", "fcn8s_paper", "fcn8s_atonce_paper",  # the paper's
         "heatmap")  # the convolutionalized ImageNet classifier (not a segmenter)
SEGMENTERS = ARCHS[:-1]
TUTORIAL_ARCHS = ARCHS[:4]
PAPER_ARCHS = ARCHS[4:8]
BACKBONES = ("vgg11", "vgg13", "vgg16", "vgg19")
LOSSES = ("cross_entropy", "cross_entropy_sum", "bce")
OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("constant", "step", "poly", "cosine")
NORMALIZATIONS = ("imagenet", "reference", "caffe")
EXPORT_FORMATS = ("onnx", "stablehlo")
