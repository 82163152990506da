"""Run a JAX model and its PyTorch twin on the same batch and measure how far apart they are."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fcn_jax.models import FCN


@dataclasses.dataclass(frozen=True)
class Difference:
    name: str  # "logits" or "x1".."x5"
    max_abs: float  # max |jax - torch|
    max_ref: float  # max |torch|

    @property
    def relative(self) -> float:
        return self.max_abs / max(self.max_ref, np.finfo(np.float64).tiny)


def torch_twin(model, torch_state_dict):
    """The PyTorch reference of ``model``'s architecture holding ``torch_state_dict`` (strict)."""
    from fcn_jax.reference import VGGNet, build_torch_model

    if isinstance(model, FCN):
        twin = build_torch_model(model.arch, model.num_classes, model.backbone.name, model.backbone.batch_norm)
    else:
        twin = VGGNet(model.name, batch_norm=model.batch_norm)
    twin.load_state_dict(torch_state_dict, strict=True)
    return twin


def compare_outputs(model, torch_model, images_nchw: np.ndarray, *, train: bool = False) -> list[Difference]:
    """Logits (FCN) or x1..x5 (backbone) of both models on ``images_nchw``, in eval or train mode.
    Both models are left in that mode; in train mode their BatchNorm statistics are updated."""
    import torch

    torch_model.train(train)
    model.train() if train else model.eval()
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(images_nchw))
    with jax.default_matmul_precision("highest"):
        out = model(jnp.asarray(images_nchw.transpose(0, 2, 3, 1)))
    if isinstance(model, FCN):
        ref, out = {"logits": ref}, {"logits": out}
    diffs = []
    for name, r in ref.items():
        r = r.numpy()
        o = np.asarray(out[name], dtype=np.float64).transpose(0, 3, 1, 2)
        diffs.append(Difference(name, float(np.abs(o - r).max()), float(np.abs(r).max())))
    return diffs
