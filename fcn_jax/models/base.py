"""What every fcn-jax network declares about itself, so that no code has to guess it from its type."""

from __future__ import annotations

from flax import nnx


class Segmenter(nnx.Module):
    """Base of every registered network: ``model(images)`` maps ``(N, H, W, 3)`` NHWC images to NHWC logits.

    Class attributes a family sets:

    - ``arch``: the registered name; ``family``: the registry family it belongs to.
    - ``size_multiple``: evaluation pads images into batches of sides rounded up to it; the logits of the real
      pixels must not change (the network pads to it itself, or masks the padding out with ``sizes``).
    - ``takes_sizes``: ``model(images, sizes=...)`` masks each image's padding out (the paper's nets).
    - ``takes_dropout_rngs``: ``model(images, rngs=...)`` in train mode draws dropout masks from ``rngs``.
    - ``takes_aux``: built with ``aux_loss=True``, ``model(images, aux=True)`` gives ``(out, aux)``, the logits of
      the main and the auxiliary head (training adds the aux head's loss).
    - ``segmenter``: logits at the input's size (False for class-score maps such as the heatmap).
    - ``min_size``: the smallest height and width the network takes.

    Instances have ``num_classes`` and ``backbone`` (its ``name`` and ``batch_norm``); :meth:`config` is what
    rebuilds the architecture (``create_model(**config)``), stored with saved weights.
    """

    arch: str = ""
    family: str = ""
    size_multiple: int = 1
    takes_sizes: bool = False
    takes_dropout_rngs: bool = False
    takes_aux: bool = False
    segmenter: bool = True
    min_size: int = 1

    def config(self) -> dict:
        """The ``create_model`` arguments that rebuild this architecture (not its weights)."""
        return {"arch": self.arch, "backbone": self.backbone.name, "batch_norm": self.backbone.batch_norm,
                "num_classes": self.num_classes}

    def describe(self) -> str:
        """``FCN8s(vgg16, batch_norm=False, num_classes=21)``: for messages."""
        options = ", ".join(f"{k}={v}" for k, v in self.config().items() if k not in ("arch", "backbone"))
        return f"{type(self).__name__}({self.backbone.name}, {options})"
