"""Rematerialisation changes what the backward pass keeps, never the numbers: one training step of each
family with and without remat gives the same loss, gradients and BatchNorm statistics (float32 within 1e-6 of
each tensor's largest value; the FCN-ResNet in float64, since over its ~50 layers XLA's different fusion of the
recomputed float32 graph moves gradients by up to 4e-6 of that scale)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fcn_jax
from fcn_jax.training.losses import cross_entropy

CASES = {  # arch, create_model options, image size, tolerance
    "tutorial fcn8s vgg11_bn": ("fcn8s", dict(backbone="vgg11", batch_norm=True), (2, 40, 56), 1e-6),
    "paper fcn8s vgg11 (narrow fc)": ("fcn8s_paper", dict(backbone="vgg11", fc_width=32), (1, 36, 44), 1e-6),
    "fcn_resnet50 with aux, float64": ("fcn_resnet50", dict(aux_loss=True, dtype=jnp.float64,
                                                            param_dtype=jnp.float64), (2, 33, 40), 1e-10),
}


def _loss_grads_stats(arch, options, shape, remat):
    model = fcn_jax.create_model(arch, num_classes=5, seed=3, remat=remat, **options)
    model.train()
    images = jax.random.normal(jax.random.key(0), (*shape, 3), options.get("dtype", jnp.float32))
    labels = jax.random.randint(jax.random.key(1), shape, 0, 5)

    def loss_fn(m):
        kw = {"rngs": nnx.Rngs(dropout=7)} if m.takes_dropout_rngs else {}
        if m.takes_aux:
            out, aux = m(images, aux=True, **kw)
            return cross_entropy(out, labels) + 0.5 * cross_entropy(aux, labels)
        return cross_entropy(m(images, **kw), labels)

    @nnx.jit
    def step(m):
        return nnx.value_and_grad(loss_fn)(m)

    with jax.default_matmul_precision("highest"):
        loss, grads = step(model)
    return loss, nnx.state(grads, nnx.Param), nnx.state(model, nnx.BatchStat)


CI_CASE = "tutorial fcn8s vgg11_bn"  # the others: the exhaustive tier


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c == CI_CASE else [pytest.mark.exhaustive])
                                  for c in CASES])
def test_remat_gives_the_same_loss_gradients_and_statistics(case):
    arch, options, shape, tolerance = CASES[case]
    with jax.enable_x64(options.get("dtype") == jnp.float64):
        plain = _loss_grads_stats(arch, options, shape, remat=False)
        remat = _loss_grads_stats(arch, options, shape, remat=True)
    np.testing.assert_allclose(remat[0], plain[0], rtol=tolerance)
    for part in (1, 2):
        want, got = jax.tree.leaves(plain[part]), jax.tree.leaves(remat[part])
        assert len(want) == len(got) and (want or part == 2)  # the paper's nets have no BatchNorm
        for w, g in zip(want, got, strict=True):
            scale = float(jnp.abs(w).max()) or 1.0
            np.testing.assert_allclose(g, w, rtol=0, atol=tolerance * scale)


def test_remat_is_not_saved_with_the_weights(tmp_path):
    model = fcn_jax.create_model("fcn32s", num_classes=3, backbone="vgg11", remat=True)
    assert model.backbone.remat and "remat" not in model.config()
    fcn_jax.save_weights(model, tmp_path / "m.safetensors")
    assert not fcn_jax.load_model(tmp_path / "m.safetensors").backbone.remat
