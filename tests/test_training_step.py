"""The compiled training step against PyTorch: losses, optimizers, several steps in float64."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fcn_jax
from fcn_jax.devices import make_mesh, replicate_state, shard_batch
from fcn_jax.errors import ConfigError
from fcn_jax.pytorch.parity import jax_twin, random_reference
from fcn_jax.training.losses import bce, cross_entropy
from fcn_jax.training.optim import make_optimizer, make_schedule
from fcn_jax.training.step import jitted_train_step, train_step
from tests.helpers import nhwc


def _batch(seed, n=2, h=32, w=64, c=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, (n, h, w))
    labels[:, :4, :8] = 255
    return rng.standard_normal((n, 3, h, w)), labels


def test_cross_entropy_with_class_weights_matches_torch(torch):
    logits, labels = np.random.default_rng(0).standard_normal((2, 5, 6, 7)), _batch(1, 2, 6, 7)[1]
    w = np.array([0.5, 1.0, 2.0, 1.5, 0.1])
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels),
                                            weight=torch.from_numpy(w),
                                            ignore_index=255)
    with jax.enable_x64(True):
        ours = cross_entropy(jnp.asarray(nhwc(logits)), jnp.asarray(labels), class_weights=tuple(w))
    assert float(ours) == pytest.approx(ref.item(), rel=1e-12)


def test_bce_matches_the_references_bce_with_logits_on_one_hot(torch):
    rng = np.random.default_rng(2)
    logits, labels = rng.standard_normal((2, 5, 6, 7)), rng.integers(0, 5, (2, 6, 7))
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(labels), 5).permute(0, 3, 1, 2).double()
    ref = torch.nn.BCEWithLogitsLoss()(torch.from_numpy(logits), one_hot)
    with jax.enable_x64(True):
        ours = bce(jnp.asarray(nhwc(logits)), jnp.asarray(labels))
    assert float(ours) == pytest.approx(ref.item(), rel=1e-12)


def test_loss_of_a_fully_ignored_batch_is_zero():
    labels = jnp.full((1, 4, 4), 255)
    assert float(cross_entropy(jnp.ones((1, 4, 4, 3)), labels)) == 0.0
    assert float(bce(jnp.ones((1, 4, 4, 3)), labels)) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name,settings", [
    # CI: test_each_optimizer_updates_like_pytorchs, and torchvision's recipe step against PyTorch in test_resnet.py
    pytest.param("sgd", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=5e-4), marks=pytest.mark.exhaustive),
    pytest.param("rmsprop", dict(lr=1e-4, momentum=0.0, nesterov=False, weight_decay=1e-5),  # the reference's
                 marks=pytest.mark.exhaustive),
])
def test_training_steps_match_torch_float64(torch, name, settings):
    tm = random_reference("fcn8s", 5, "vgg11", True, seed=11, double=True).train()
    if name == "sgd":
        topt = torch.optim.SGD(tm.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                               nesterov=settings["nesterov"], weight_decay=settings["weight_decay"])
    else:
        topt = torch.optim.RMSprop(tm.parameters(), lr=settings["lr"], alpha=0.99, eps=1e-8,
                                   weight_decay=settings["weight_decay"])
    batches = [_batch(s) for s in range(4)]
    torch_losses = []
    for x, y in batches:
        topt.zero_grad()
        loss = torch.nn.functional.cross_entropy(tm(torch.from_numpy(x)), torch.from_numpy(y), ignore_index=255)
        loss.backward()
        topt.step()
        torch_losses.append(loss.item())

    with jax.enable_x64(True):
        model = jax_twin(random_reference("fcn8s", 5, "vgg11", True, seed=11, double=True), "fcn8s", dtype=jnp.float64)
        model.train()
        tx = make_optimizer(name, optax.constant_schedule(settings["lr"]), momentum=settings["momentum"],
                            nesterov=settings["nesterov"], weight_decay=settings["weight_decay"])
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        loss_fn = functools.partial(cross_entropy, ignore_index=255, class_weights=None)
        losses = [float(train_step(model, optimizer, jnp.asarray(nhwc(x)), jnp.asarray(y), loss_fn))
                  for x, y in batches]
        final = fcn_jax.to_torch_state_dict(model)
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-8)
    for key, v in tm.state_dict().items():  # parameters and BatchNorm statistics after the steps
        np.testing.assert_allclose(final[key], v.numpy(), rtol=1e-7, atol=1e-9, err_msg=key)


@pytest.mark.parametrize("name,settings,torch_optimizer", [
    ("sgd", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=5e-4), "SGD"),
    ("rmsprop", dict(lr=1e-3, momentum=0.5, nesterov=False, weight_decay=1e-5), "RMSprop"),
    ("adamw", dict(lr=1e-3, momentum=0.0, nesterov=False, weight_decay=1e-2), "AdamW")])
def test_each_optimizer_updates_like_pytorchs(torch, name, settings, torch_optimizer):
    """Four updates of two tensors from the same gradients, float64 (the whole step with a model, in the exhaustive
    tier: test_training_steps_match_torch_float64)."""
    rng = np.random.default_rng(0)
    params = {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(4)]
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    extra = {"SGD": dict(momentum=settings["momentum"], nesterov=settings["nesterov"]),
             "RMSprop": dict(alpha=0.99, eps=1e-8, momentum=settings["momentum"]),
             "AdamW": dict(eps=1e-8)}[torch_optimizer]
    topt = getattr(torch.optim, torch_optimizer)(tensors.values(), lr=settings["lr"],
                                                 weight_decay=settings["weight_decay"], **extra)
    with jax.enable_x64(True):
        tx = make_optimizer(name, optax.constant_schedule(settings["lr"]), momentum=settings["momentum"],
                            nesterov=settings["nesterov"], weight_decay=settings["weight_decay"])
        ours = jax.tree.map(jnp.asarray, params)
        state = tx.init(ours)
        for g in grads:
            for k, t in tensors.items():
                t.grad = torch.tensor(g[k])
            topt.step()
            updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, ours)
            ours = optax.apply_updates(ours, updates)
            for k, t in tensors.items():
                np.testing.assert_allclose(np.asarray(ours[k]), t.detach().numpy(), rtol=1e-12, err_msg=k)


def test_schedules():
    step = make_schedule("step", 0.1, total_steps=100, steps_per_epoch=10, step_epochs=2, gamma=0.5)
    assert [float(step(s)) for s in (0, 19, 20, 40)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    warm = make_schedule("cosine", 1.0, total_steps=110, steps_per_epoch=10, warmup_steps=10)
    assert float(warm(5)) == pytest.approx(0.5) and float(warm(10)) == pytest.approx(1.0)
    assert float(warm(110)) == pytest.approx(0.0, abs=1e-7)
    poly = make_schedule("poly", 1.0, total_steps=100, steps_per_epoch=10, power=0.9)
    assert float(poly(50)) == pytest.approx(0.5 ** 0.9)
    with pytest.raises(ConfigError, match="unknown schedule"):
        make_schedule("linear", 1.0, total_steps=1, steps_per_epoch=1)


@pytest.mark.slow
def test_frozen_backbone_is_not_updated_but_its_batchnorm_statistics_are():
    from fcn_jax.training.step import trainable

    model = fcn_jax.create_model("fcn32s", num_classes=3, backbone="vgg11", batch_norm=True)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=trainable(True))
    kernel = np.asarray(model.backbone.convs[0].kernel[...]).copy()
    classifier = np.asarray(model.classifier.kernel[...]).copy()
    x, y = _batch(0, c=3)
    train_step(model, optimizer, jnp.asarray(nhwc(x), jnp.float32), jnp.asarray(y), cross_entropy)
    np.testing.assert_array_equal(model.backbone.convs[0].kernel[...], kernel)
    assert not np.array_equal(model.classifier.kernel[...], classifier)
    assert int(model.backbone.bns[0].num_batches_tracked[...]) == 1


@pytest.mark.exhaustive  # CI: every training run in the tests is one, and test_multidevice's 1- and 8-device meshes
def test_step_on_a_one_device_mesh_runs_with_sharded_inputs():
    model = fcn_jax.create_model("fcns", num_classes=5, backbone="vgg11", batch_norm=True)
    optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
    mesh = make_mesh()
    replicate_state((model, optimizer), mesh)
    x, y = _batch(3)
    batch = shard_batch({"image": nhwc(x).astype(np.float32), "label": y.astype(np.int32)}, mesh)
    loss = train_step(model, optimizer, batch["image"], batch["label"], cross_entropy)
    assert np.isfinite(float(loss))


def _copied_parameters(compiled_hlo: str) -> list[str]:
    entry = compiled_hlo[compiled_hlo.index("ENTRY"):]
    parameters = set(re.findall(r"%(\S+) = \S+ parameter\(\d+\)", entry))
    return [name for name in re.findall(r" copy\(%([^)]+)\)", entry) if name in parameters]


@pytest.mark.slow
def test_cpu_step_writes_new_buffers_instead_of_copying_donated_parameters():
    # Donated on CPU, XLA copies every parameter before updating it in place (slower than new buffers).
    model = fcn_jax.create_model("fcn16s", num_classes=5, backbone="vgg11", batch_norm=True)
    optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)
    x, y = _batch(4, h=32, w=32)
    images, labels = jnp.asarray(nhwc(x), jnp.float32), jnp.asarray(y)
    compiled = jitted_train_step().lower(model, optimizer, images, labels, cross_entropy).compile()
    assert _copied_parameters(compiled.as_text()) == []
    kernel = model.backbone.convs[0].kernel[...]
    train_step(model, optimizer, images, labels, cross_entropy)
    assert not kernel.is_deleted()  # not donated
    assert not np.array_equal(model.backbone.convs[0].kernel[...], kernel)
