"""The JAX models against our PyTorch reference, on random weights with non-trivial BatchNorm.

Tolerances (the bar, from the foundation issue): eval logits <= 1e-5 x max|logit|, train-mode
logits <= 1e-4 x max|logit|, backbone features likewise, running statistics <= 1e-5 relative, and
float64 gradients <= 1e-8 of each tensor's largest gradient.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fcn_jax
from fcn_jax import registry
from fcn_jax.models import torch_feature_indices
from fcn_jax.models.fcn import FCN
from fcn_jax.pytorch.parity import jax_twin, random_reference
from tests.helpers import assert_close, nchw, nhwc

TUTORIAL_ARCHS = registry.archs(family="tutorial")

MODELS = list(itertools.product(TUTORIAL_ARCHS, fcn_jax.BACKBONES, (False, True)))  # the paper's: test_paper_models


# The cover `make test` runs: every arch with and without BatchNorm on vgg11, and a deeper VGG (depth only changes
# the backbone's tuple of layers); every arch x depth x BatchNorm is the exhaustive tier.
COVER = {(a, "vgg11", bn) for a in TUTORIAL_ARCHS for bn in (False, True)} | {("fcn8s", "vgg16", False),
                                                                            ("fcns", "vgg16", True)}
# Gradients (`make test`): fcn8s on vgg11_bn (the skips, every ConvTranspose and train-mode BatchNorm). The forward
# cover above already catches a wrong layer of any arch, depth and BatchNorm; autodiff through it is the same code.
GRADIENT_COVER = {("fcn8s", "vgg11", True)}


def matrix(fast: tuple | None, cover: set = COVER):
    """Every arch x backbone x BatchNorm: ``fast`` in every tier, ``cover`` in `make test` (slow), the rest
    exhaustive."""
    return [pytest.param(*m, id=f"{m[0]}-{m[1]}{'_bn' if m[2] else ''}",
                         marks=() if m == fast else pytest.mark.slow if m in cover else pytest.mark.exhaustive)
            for m in MODELS]


EVAL_RTOL, TRAIN_RTOL, STATS_RTOL, GRAD_RTOL = 1e-5, 1e-4, 1e-5, 1e-8


def _batch(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _bn_stats(torch_model, model: FCN):
    """Pairs (name, torch running stat, JAX running stat) for every BatchNorm of the model."""
    sd = fcn_jax.to_torch_state_dict(model)
    return [(k, v.numpy(), sd[k]) for k, v in torch_model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]


@pytest.mark.parametrize("arch,backbone,batch_norm", matrix(fast=("fcn8s", "vgg11", True)))
def test_matches_reference_eval_and_train(torch, arch, backbone, batch_norm):
    tm = random_reference(arch, 5, backbone, batch_norm, seed=1)
    m = jax_twin(tm, arch)
    x = _batch((2, 3, 64, 96))
    xt, xj = torch.from_numpy(x), jnp.asarray(nhwc(x))

    with jax.default_matmul_precision("highest"), torch.no_grad():
        tm.eval(), m.eval()
        assert_close(nchw(m(xj)), tm(xt).numpy(), EVAL_RTOL, "eval logits")
        ref_feats, feats = tm.pretrained_net(xt), m.backbone(xj)
        for name in ("x1", "x2", "x3", "x4", "x5"):
            assert_close(nchw(feats[name]), ref_feats[name].numpy(), EVAL_RTOL, f"eval {name}")

        tm.train(), m.train()
        ref_feats, feats = tm.pretrained_net(xt), m.backbone(xj)  # 1st train-mode forward of the backbone
        for name in ("x1", "x2", "x3", "x4", "x5"):
            assert_close(nchw(feats[name]), ref_feats[name].numpy(), TRAIN_RTOL, f"train {name}")
        for step in range(2):  # 2nd and 3rd: the backbone's BN has now seen three batches
            xs = _batch((2, 3, 64, 96), seed=10 + step)
            assert_close(nchw(m(jnp.asarray(nhwc(xs)))), tm(torch.from_numpy(xs)).numpy(), TRAIN_RTOL,
                         f"train logits, step {step}")
    for key, ref, ours in _bn_stats(tm, m):
        if key.endswith("num_batches_tracked"):
            assert ours == ref, key
        else:
            assert_close(ours, ref, STATS_RTOL, key)


def _softmax_ce(logits, labels, ignore=255):
    valid = labels != ignore
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)


@pytest.mark.parametrize("arch,backbone,batch_norm", matrix(fast=None, cover=GRADIENT_COVER))
def test_gradients_match_reference_float64(torch, arch, backbone, batch_norm):
    """Train-mode gradients of a pixel-wise softmax cross-entropy (ignore label 255), float64."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 32, 64))
    y = rng.integers(0, 5, (2, 32, 64))
    y[:, :4, :8] = 255
    tm = random_reference(arch, 5, backbone, batch_norm, seed=3, double=True).train()
    loss = torch.nn.functional.cross_entropy(tm(torch.from_numpy(x)), torch.from_numpy(y), ignore_index=255)
    loss.backward()
    ref = {k: p.grad.numpy() for k, p in tm.named_parameters()}

    with jax.enable_x64(True):
        m = jax_twin(tm, arch, dtype=jnp.float64)
        m.train()
        # One compiled program: run eagerly, float64 compiles every small operation on its own (~20 s here).
        loss_and_grads = nnx.jit(nnx.value_and_grad(lambda m: _softmax_ce(m(jnp.asarray(nhwc(x))), jnp.asarray(y))))
        ours_loss, grads = loss_and_grads(m)
        holder = nnx.clone(m)  # the converter lays the gradients out as torch's parameters
        nnx.update(holder, grads)
        ours = fcn_jax.to_torch_state_dict(holder)
    assert abs(float(ours_loss) - loss.item()) <= 1e-12 * abs(loss.item())
    largest = max(np.abs(g).max() for g in ref.values())
    # A conv bias right before a train-mode BatchNorm has a true gradient of zero: judge its noise
    # against the model's largest gradient instead.
    before_bn = {f"pretrained_net.features.{conv}.bias"
                 for conv, bn in torch_feature_indices(backbone, batch_norm) if bn is not None}
    for key, g in ref.items():
        scale = 1e-6 * largest if key in before_bn else np.abs(g).max()
        err = np.abs(ours[key] - g).max()
        assert err <= GRAD_RTOL * scale, f"{key}: max abs error {err:.3e} > {GRAD_RTOL:g} x {scale:.3e}"


@pytest.mark.slow
def test_any_input_size_equals_reference_on_padded_input(torch):
    """Sizes that are not multiples of 32 crash the reference; ours pads bottom/right with zeros to
    the next multiple of 32 and crops the logits back."""
    tm = random_reference("fcn8s", 4, "vgg11", True, seed=4).eval()
    m = jax_twin(tm, "fcn8s")
    m.eval()
    x = _batch((1, 3, 45, 70))
    padded = np.pad(x, ((0, 0), (0, 0), (0, 64 - 45), (0, 96 - 70)))
    with torch.no_grad():
        ref = tm(torch.from_numpy(padded)).numpy()[:, :, :45, :70]
    assert_close(nchw(m(jnp.asarray(nhwc(x)))), ref, EVAL_RTOL, "logits at 45x70")


@pytest.mark.exhaustive
def test_full_size_fcn8s_vgg16_eval(torch):
    tm = random_reference("fcn8s", 21, "vgg16", False, seed=5).eval()
    m = jax_twin(tm, "fcn8s")
    m.eval()
    x = _batch((1, 3, 224, 224))
    with torch.no_grad(), jax.default_matmul_precision("highest"):
        assert_close(nchw(m(jnp.asarray(nhwc(x)))), tm(torch.from_numpy(x)).numpy(), EVAL_RTOL, "logits 224x224")


@pytest.mark.parametrize("name", [pytest.param(f"{b}{s}", marks=pytest.mark.slow if b == "vgg11" or f"{b}{s}" ==
                                               "vgg16_bn" else pytest.mark.exhaustive)
                                  for b in fcn_jax.BACKBONES for s in ("", "_bn")])
def test_torchvision_vgg_loads_into_backbone(torch, name):
    """torchvision's real VGG modules (random init): our backbone gives the outputs of applying
    torchvision's ``features`` in order, taken after each max-pool."""
    import torchvision

    from fcn_jax.pytorch.reference import randomize_batchnorm_

    torch.manual_seed(6)
    tv = randomize_batchnorm_(getattr(torchvision.models, name)(weights=None), 6).eval()
    backbone = fcn_jax.VGGBackbone(name.removesuffix("_bn"), batch_norm=name.endswith("_bn"), rngs=nnx.Rngs(0))
    report = fcn_jax.load_torch_state_dict(backbone, tv.state_dict())
    assert sorted(report.ignored) == sorted(f"classifier.{i}.{t}" for i in (0, 3, 6) for t in ("weight", "bias"))
    backbone.eval()
    x = _batch((2, 3, 64, 64))
    ref, h = [], torch.from_numpy(x)
    with torch.no_grad():
        for layer in tv.features:
            h = layer(h)
            if isinstance(layer, torch.nn.MaxPool2d):
                ref.append(h.numpy())
    feats = backbone(jnp.asarray(nhwc(x)))
    assert len(ref) == 5
    for i, r in enumerate(ref, start=1):
        assert_close(nchw(feats[f"x{i}"]), r, EVAL_RTOL, f"{name} x{i}")
