"""``fcn-jax heatmap``: what the convolutionalized classifier sees where (the paper's "tabby cat" figure).

The ``heatmap`` model scores ImageNet's classes at every 32-pixel step of an image of any size (at least
224x224). The picture shows the image and, for the classes with the highest score anywhere, their softmax
probability map (over the classes, at each position) upsampled to the image and laid over it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax.atomic_files import refuse_overwriting
from fcn_jax.data.files import read_image
from fcn_jax.data.normalization import normalize
from fcn_jax.errors import ConfigError, InputError
from fcn_jax.inference.drawing import heatmap_picture
from fcn_jax.models.modes import in_mode
from fcn_jax.models.paper import Heatmap
from fcn_jax.weights.native import load_model, read_weights_config

SMALLEST = 224  # fc6 needs a 7x7 pool5


def class_maps(model: Heatmap, image: np.ndarray, *, normalization: str = "imagenet") -> np.ndarray:
    """``(H', W', num_classes)`` softmax probabilities of ``image`` (uint8 RGB, at least 224x224), in eval mode."""
    h, w = image.shape[:2]
    if min(h, w) < SMALLEST:
        raise InputError(f"the heatmap needs images of at least {SMALLEST}x{SMALLEST}, got {w}x{h}")
    with in_mode(model, train=False):
        scores = model(jnp.asarray(normalize(image[None], normalization)))[0]
    return np.asarray(jax.nn.softmax(scores.astype(jnp.float32), axis=-1))


def run_heatmap(weights: str, image_path: str, output: str, *, top: int = 3, normalization: str = "imagenet") -> list:
    """Write the picture (:func:`fcn_jax.inference.drawing.heatmap_picture`) to ``output``; returns the top classes as
    ``[(class name, peak probability)]``."""
    if top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    if Path(output).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ConfigError(f"--output {output}: give a .png or .jpg file")
    refuse_overwriting([("--output", output)], [("the image", image_path), ("the weights", weights)])
    meta = read_weights_config(weights)
    if meta.get("arch") != "heatmap":
        raise ConfigError(f"{weights} holds {meta.get('arch') or 'a VGG backbone'}, not the heatmap model: convert "
                          f"torchvision's VGG with `fcn-jax convert --torchvision vgg16 --arch heatmap --output FILE`")
    if top > meta["num_classes"]:
        raise ConfigError(f"--top {top}: the model has {meta['num_classes']} classes; give at most that many")
    image = read_image(Path(image_path), fix="give a PNG or JPEG photo")
    model = load_model(weights)
    names = meta.get("class_names") or [f"class {i}" for i in range(model.num_classes)]
    maps = class_maps(model, image, normalization=normalization)
    heatmap_picture(image, maps, names, top).save(output)
    peaks = maps.reshape(-1, maps.shape[-1]).max(0)
    return [(names[c], float(peaks[c])) for c in np.argsort(-peaks)[:top]]
