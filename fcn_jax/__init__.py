"""fcn-jax: Fully Convolutional Networks for semantic segmentation in JAX / Flax NNX.

Images are NHWC float arrays; models return NHWC logits of the input's size. PyTorch is only
needed for reading ``.pth`` files and for :mod:`fcn_jax.reference`.
"""

from fcn_jax.xla_flags import apply_default_xla_flags

apply_default_xla_flags()  # before anything starts JAX's backend; see fcn_jax/xla_flags.py

from fcn_jax.convert import infer_config, load_torch_state_dict, read_torch_state_dict, to_torch_state_dict
from fcn_jax.errors import FcnJaxError, WeightsError
from fcn_jax.models import ARCHS, BACKBONES, FCN, VGGBackbone, create_model
from fcn_jax.prediction import predict
from fcn_jax.summary import summary
from fcn_jax.weights import load_model, load_weights, save_weights

__version__ = "0.1.0"

__all__ = ["ARCHS", "BACKBONES", "FCN", "FcnJaxError", "VGGBackbone", "WeightsError", "create_model",
           "infer_config", "load_model", "load_torch_state_dict", "load_weights", "predict", "read_torch_state_dict",
           "save_weights", "summary", "to_torch_state_dict"]
