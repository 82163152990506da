"""fcn-jax: Fully Convolutional Networks for semantic segmentation in JAX / Flax NNX.

Images are NHWC float arrays; models return NHWC logits of the input's size. Importing the package
changes no process state. PyTorch is only needed for ``.pth`` files and :mod:`fcn_jax.pytorch`.
"""

from fcn_jax.conversion import infer_config, load_torch_state_dict, read_torch_state_dict, to_torch_state_dict
from fcn_jax.errors import (
                            ConfigError,
                            DatasetError,
                            FcnJaxError,
                            InputError,
                            MissingExtraError,
                            RunError,
                            TrainingDiverged,
                            WeightsError,
)
from fcn_jax.models import ARCHS, BACKBONES, FCN, VGGBackbone, create_model
from fcn_jax.prediction import predict
from fcn_jax.summary import summary
from fcn_jax.weights import load_model, load_weights, save_weights
from fcn_jax.xla_flags import use_fast_cpu_convolutions

__version__ = "0.1.0"

__all__ = ["ARCHS", "BACKBONES", "FCN", "ConfigError", "DatasetError", "FcnJaxError", "InputError",
           "MissingExtraError", "RunError", "TrainingDiverged", "VGGBackbone", "WeightsError", "create_model",
           "infer_config", "load_model", "load_torch_state_dict", "load_weights", "predict", "read_torch_state_dict",
           "save_weights", "summary", "to_torch_state_dict", "use_fast_cpu_convolutions"]
