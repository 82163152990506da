"""The paper's FCNs and the convolutionalized VGG: against their PyTorch reference (written from the published
description) and torchvision, the published weight layout both ways, and what training may change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fcn_jax
from fcn_jax import registry
from fcn_jax.errors import WeightsError
from fcn_jax.models import MODELS
from fcn_jax.models.layers import max_pool_2x2, pad_to_even
from fcn_jax.models.paper import Upsampling, bilinear_kernel
from fcn_jax.training.losses import cross_entropy
from fcn_jax.training.step import train_step, trainable
from tests.helpers import NARROW, TinyDataset, assert_close, forward, nchw, nhwc

PAPER_ARCHS = registry.archs(family="paper")


def _pair(arch, backbone="vgg11", num_classes=5, seed=1, dropout=0.5):
    from fcn_jax.pytorch.paper_reference import build_paper_model

    twin = build_paper_model(arch, num_classes, backbone, seed=seed, fc_width=NARROW)
    model = MODELS[arch](num_classes, backbone=backbone, dropout=dropout, fc_width=NARROW, rngs=nnx.Rngs(0))
    fcn_jax.load_torch_state_dict(model, {k: v.numpy() for k, v in twin.state_dict().items()})
    return model, twin


def _check_logits(model, twin, torch, size, *, train=False, rtol=1e-5):
    x = np.random.default_rng(sum(size)).standard_normal((2, 3, *size)).astype(np.float32)
    twin.train(train)
    model.train() if train else model.eval()
    with torch.no_grad():
        ref = twin(torch.from_numpy(x)).numpy()
    with jax.default_matmul_precision("highest"):
        out = nchw(np.asarray(forward(model, jnp.asarray(nhwc(x)))))
    assert out.shape == ref.shape == (2, model.num_classes, *size)
    assert_close(out, ref, rtol, f"{model.arch} {size}")


def test_the_upsampling_starts_as_the_published_bilinear_kernel():
    k = bilinear_kernel(4, 3)
    ramp = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(k[:, :, 1, 1], np.outer(ramp, ramp))
    assert not k[:, :, 0, 1].any() and not k[:, :, 2, 0].any()
    odd = bilinear_kernel(3, 1)[:, :, 0, 0]
    np.testing.assert_allclose(odd[1], [0.5, 1.0, 0.5])


def test_ceil_mode_pooling_matches_pytorch_forward_and_backward(torch):
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    tx = torch.from_numpy(nchw(x)).requires_grad_(True)
    ref = torch.nn.functional.max_pool2d(tx, 2, 2, ceil_mode=True)
    ref.sum().backward()

    def pooled_sum(v):
        return max_pool_2x2(pad_to_even(v)).sum()

    out = max_pool_2x2(pad_to_even(jnp.asarray(x)))
    np.testing.assert_array_equal(nchw(np.asarray(out)), ref.detach().numpy())
    np.testing.assert_array_equal(nchw(np.asarray(jax.grad(pooled_sum)(jnp.asarray(x)))), tx.grad.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_each_paper_head_matches_the_reference_at_any_size(torch, arch):
    model, twin = _pair(arch)
    for size in ((1, 1), (31, 47)):
        _check_logits(model, twin, torch, size)


@pytest.mark.exhaustive  # the heads on vgg11: test_each_paper_head_matches_the_reference_at_any_size
@pytest.mark.parametrize("backbone", ["vgg13", "vgg16", "vgg19"])
@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_every_head_on_every_depth_matches_the_reference(torch, arch, backbone):
    model, twin = _pair(arch, backbone)
    _check_logits(model, twin, torch, (33, 40))


@pytest.mark.slow
def test_train_mode_with_dropout_off_and_odd_sizes_match(torch):
    model, twin = _pair("fcn8s_paper", dropout=0.0)
    twin.drop6.p = twin.drop7.p = 0.0
    for size in ((97, 131), (2, 3)):
        _check_logits(model, twin, torch, size, train=True)


@pytest.mark.exhaustive  # the CI cover: ceil-mode pooling forward and backward, every head forward, frozen upsampling
def test_float64_gradients_match(torch):
    from fcn_jax.pytorch.paper_reference import build_paper_model

    twin = build_paper_model("fcn16s_paper", 4, "vgg11", seed=2, fc_width=NARROW).double().eval()
    x = np.random.default_rng(3).standard_normal((1, 3, 21, 26))
    weights = np.random.default_rng(4).standard_normal((1, 4, 21, 26))
    (twin(torch.from_numpy(x)) * torch.from_numpy(weights)).sum().backward()
    with jax.enable_x64(True):
        model = MODELS["fcn16s_paper"](4, backbone="vgg11", fc_width=NARROW, dtype=jnp.float64,
                                       param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        fcn_jax.load_torch_state_dict(model, {k: v.detach().numpy() for k, v in twin.state_dict().items()})
        model.eval()

        def objective(model):
            return (model(jnp.asarray(nhwc(x))) * jnp.asarray(nhwc(weights))).sum()

        grads = nnx.jit(nnx.grad(objective))(model)
        for name, param in twin.named_parameters():
            ours = {"score_fr": grads.score_fr, "score_pool4": grads.score_pool4}.get(name.split(".")[0])
            if ours is not None:
                field = "kernel" if name.endswith("weight") else "bias"
                g = np.asarray(getattr(ours, field)[...])
                g = g.transpose(3, 2, 0, 1) if g.ndim == 4 else g
                assert_close(g, param.grad.numpy(), 1e-10, name)
        conv = np.asarray(grads.vgg.backbone.convs[0].kernel[...]).transpose(3, 2, 0, 1)
        assert_close(conv, twin.conv1_1.weight.grad.numpy(), 1e-10, "conv1_1")


@pytest.mark.slow
def test_published_weights_load_bare_and_wrapped_and_convert_back_exactly(torch, tmp_path):
    """4096 wide, as published: in a process of its own (spawned), whose ~2 GB end with it, so that a test worker
    stays under 4 GB."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_published_layout_round_trip, args=(tmp_path,))
    child.start()
    child.join(timeout=600)
    assert child.exitcode == 0, "the round trip failed in its process (its traceback is above)"


def _published_layout_round_trip(tmp_path):
    import torch

    from fcn_jax.pytorch.paper_reference import build_paper_model

    state = build_paper_model("fcn8s_paper", 21, "vgg11").state_dict()
    torch.save({"model_state_dict": state}, tmp_path / "wrapped.pth")

    def shapes_only():  # every variable is loaded: no random start (a full-width one is 0.5 GB more)
        return nnx.eval_shape(lambda: fcn_jax.create_model("fcn8s_paper", num_classes=21, backbone="vgg11"))

    model = shapes_only()
    fcn_jax.load_torch_state_dict(model, tmp_path / "wrapped.pth")
    back = fcn_jax.to_torch_state_dict(model)
    assert set(back) == set(state)
    assert all(np.array_equal(back[k], v.numpy()) for k, v in state.items())
    del state
    again = shapes_only()
    fcn_jax.load_torch_state_dict(again, back)  # the bare state_dict
    assert np.array_equal(again.upscore8.kernel[...], model.upscore8.kernel[...])


def test_a_layout_given_to_the_other_family_names_the_right_arch():
    paper = {"conv1_1.weight": np.zeros(1), "score_fr.weight": np.zeros((21, 1, 1, 1)), "upscore16.weight": 0}
    tutorial = {"pretrained_net.features.0.weight": np.zeros(1), "classifier.weight": np.zeros((21, 1, 1, 1))}
    with pytest.raises(WeightsError, match=r"layout of the paper's FCNs.* build fcn16s_paper instead"):
        fcn_jax.load_torch_state_dict(nnx.eval_shape(lambda: fcn_jax.create_model("fcn16s", backbone="vgg11")),
                                      {k: np.asarray(v) for k, v in paper.items()})
    with pytest.raises(WeightsError, match=r"tutorial.s FCNs.* build fcn32s, fcn16s, fcn8s or fcns instead"):
        fcn_jax.load_torch_state_dict(
            nnx.eval_shape(lambda: fcn_jax.create_model("fcn16s_paper", backbone="vgg11")), tutorial)


@pytest.mark.exhaustive  # 4096-wide fc6/fc7 at 224x224 beside torchvision's VGG: 5.6 GB, over a CI worker's budget
def test_the_heatmap_at_224_is_torchvisions_classifier_and_scores_larger_images(torch):
    import torchvision

    from fcn_jax.pytorch.paper_reference import Heatmap

    torch.manual_seed(0)
    vgg = torchvision.models.vgg11().eval()
    heatmap = fcn_jax.create_model("heatmap", num_classes=1000, backbone="vgg11")
    fcn_jax.load_torch_state_dict(heatmap, vgg.state_dict())
    heatmap.eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad(), jax.default_matmul_precision("highest"):
        logits = vgg(torch.from_numpy(x)).numpy()
        scores = np.asarray(heatmap(jnp.asarray(nhwc(x))))
        assert scores.shape == (2, 1, 1, 1000)
        assert_close(scores[:, 0, 0], logits, 1e-5, "224x224 logits")
        conv_twin = Heatmap(1000, "vgg11").eval()
        conv_twin.load_state_dict(vgg.state_dict())
        big = np.random.default_rng(2).standard_normal((1, 3, 256, 300)).astype(np.float32)
        assert_close(nchw(np.asarray(heatmap(jnp.asarray(nhwc(big))))), conv_twin(torch.from_numpy(big)).numpy(),
                     1e-5, "heatmap 256x300")
    back = fcn_jax.to_torch_state_dict(heatmap)
    assert all(np.array_equal(back[k], v.numpy()) for k, v in vgg.state_dict().items())


@pytest.mark.exhaustive  # 4096 wide; CI: the published layout (test_published_weights_...) and tutorial backbones
def test_an_imagenet_vgg_initialises_the_paper_trunk_and_leaves_the_head(torch):
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg11()
    model = fcn_jax.create_model("fcn32s_paper", num_classes=5, backbone="vgg11")
    report = fcn_jax.load_torch_state_dict(model, vgg.state_dict())
    assert any("fc8 (classifier.6) is not used" in note for note in report.notes)
    assert report.ignored == ["classifier.6.weight", "classifier.6.bias"]
    fc6 = vgg.classifier[0].weight.detach().numpy().reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(model.vgg.fc6.kernel[...], fc6)
    assert not np.asarray(model.score_fr.kernel[...]).any()  # the head keeps its (zero) initialisation


@pytest.mark.slow
def test_training_leaves_the_upsampling_frozen_unless_asked_and_dropout_follows_seed_and_step():
    def step(learn_upsampling=False, dropout_seed=0):
        model = MODELS["fcn16s_paper"](3, backbone="vgg11", fc_width=NARROW, rngs=nnx.Rngs(0))
        model.score_fr.kernel.set_value(0.01 * jax.random.normal(jax.random.key(0), model.score_fr.kernel.shape))
        optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=trainable(False, learn_upsampling))
        x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 12, 12, 3)), jnp.float32)
        y = jnp.asarray(np.random.default_rng(1).integers(0, 3, (1, 12, 12)))
        before = np.asarray(model.upscore2.kernel[...])
        loss = float(train_step(model, optimizer, x, y, cross_entropy, dropout_seed=dropout_seed))
        return loss, not np.array_equal(before, model.upscore2.kernel[...])

    published = nnx.eval_shape(lambda: MODELS["fcn16s_paper"](3, fc_width=NARROW, rngs=nnx.Rngs(0)))
    assert isinstance(published.upscore2.kernel, Upsampling)
    frozen_loss, changed = step()
    assert not changed
    assert step(learn_upsampling=True)[1]
    assert step()[0] == frozen_loss  # the same seed and step: the same dropout masks
    assert step(dropout_seed=1)[0] != frozen_loss


def test_the_caffe_input_convention():
    from fcn_jax.data import normalize

    pixel = np.array([[[10, 20, 30]]], np.uint8)  # RGB
    np.testing.assert_allclose(normalize(pixel, "caffe")[0, 0], [30 - 104.00698793, 20 - 116.66876762,
                                                                 10 - 122.67891434], rtol=1e-6)


@pytest.mark.slow
def test_the_summed_loss_is_the_mean_times_the_valid_pixels():
    from fcn_jax.training.losses import cross_entropy_sum

    logits = jax.random.normal(jax.random.key(0), (2, 5, 6, 4))
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 4, (2, 5, 6))).at[0, 0, :3].set(255)
    np.testing.assert_allclose(float(cross_entropy_sum(logits, labels)),
                               float(cross_entropy(logits, labels)) * (2 * 5 * 6 - 3), rtol=1e-5)


def test_biases_can_learn_twice_as_fast_without_weight_decay():
    from fcn_jax.training.optim import make_optimizer

    params = {"conv": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    grads = {"conv": {"kernel": jnp.full((2, 2), 0.5), "bias": jnp.full(2, 0.5)}}
    tx = make_optimizer("sgd", optax.constant_schedule(0.1), momentum=0.0, weight_decay=0.01, bias_lr_factor=2.0,
                        decay_biases=False)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * (0.5 + 0.01 * 1.0))
    np.testing.assert_allclose(updates["conv"]["bias"], -0.2 * 0.5)


def test_the_paper_presets_follow_the_published_recipe():
    from fcn_jax.training.config import resolve_config

    lrs = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14, "fcn8s_atonce": 1e-10}
    for name, lr in lrs.items():
        config = resolve_config(f"voc-{name}-paper", data_dir="data")
        assert (config.arch, config.lr, config.batch_size, config.loss) == (f"{name}_paper", lr, 1, "cross_entropy_sum")
        assert (config.momentum, config.weight_decay, config.bias_lr_factor, config.decay_biases) == (0.99, 5e-4, 2.0,
                                                                                                      False)
        assert config.normalization == "caffe" and not config.learn_upsampling and not config.batch_norm


@pytest.mark.slow
def test_fcn16s_starts_from_a_trained_fcn32s_layer_by_layer(tmp_path):
    from fcn_jax.weights.native import load_matching

    fcn32s = MODELS["fcn32s_paper"](3, backbone="vgg11", fc_width=NARROW, rngs=nnx.Rngs(1))
    fcn_jax.save_weights(fcn32s, tmp_path / "fcn32s.safetensors")
    fcn16s = MODELS["fcn16s_paper"](3, backbone="vgg11", fc_width=NARROW, rngs=nnx.Rngs(2))
    copied, left = load_matching(fcn16s, tmp_path / "fcn32s.safetensors")
    assert "vgg.fc6.kernel" in copied and "score_fr.bias" in copied
    assert set(left) == {"score_pool4.kernel", "score_pool4.bias", "upscore2.kernel", "upscore16.kernel"}
    np.testing.assert_array_equal(fcn16s.vgg.fc7.kernel[...], fcn32s.vgg.fc7.kernel[...])


@pytest.mark.exhaustive
def test_the_heatmap_command_draws_the_top_classes_with_their_names(tmp_path, capsys):
    from PIL import Image

    from fcn_jax.cli import main

    model = fcn_jax.create_model("heatmap", num_classes=4, backbone="vgg11", seed=0)
    names = ["tabby cat", "dog", "car", "boat"]
    fcn_jax.save_weights(model, tmp_path / "heat.safetensors", class_names=names)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 256, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "a_heat.png"
    assert main(["heatmap", str(tmp_path / "heat.safetensors"), str(tmp_path / "a.png"), "--output", str(out),
                 "--top", "2"]) == 0
    printed = capsys.readouterr().out
    assert sum(name in printed for name in names) == 2 and Image.open(out).size == (3 * 256, 224 + 20)
    Image.fromarray(np.zeros((100, 300, 3), np.uint8)).save(tmp_path / "small.png")
    assert main(["heatmap", str(tmp_path / "heat.safetensors"), str(tmp_path / "small.png"), "--output",
                 str(out)]) == 2
    assert "at least 224x224" in capsys.readouterr().err


@pytest.mark.exhaustive  # the same property as the evaluation test below, logit by logit
def test_padded_batches_give_each_paper_image_its_own_logits():
    # The paper's nets do not pad themselves: EvalBatches pads images of different sizes into one batch, and the
    # sizes mask the padding back out, so that one program serves many sizes with per-image results.
    from fcn_jax.data.pipeline import EvalBatches

    model = MODELS["fcn8s_paper"](3, backbone="vgg11", fc_width=NARROW, rngs=nnx.Rngs(0))
    model.eval()
    for layer in (model.score_fr, model.score_pool4, model.score_pool3):
        layer.kernel.set_value(0.05 * jax.random.normal(jax.random.key(1), layer.kernel.shape))
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in ((37, 50), (64, 41), (9, 64))]
    canvas = np.zeros((3, 64, 64, 3), np.float32)
    for i, image in enumerate(images):
        canvas[i, :image.shape[0], :image.shape[1]] = image
    sizes = np.array([image.shape[:2] for image in images], np.int32)
    with jax.default_matmul_precision("highest"):
        batched = np.asarray(model(jnp.asarray(canvas), sizes=jnp.asarray(sizes)))
        unmasked = np.asarray(model(jnp.asarray(canvas)))
        for i, image in enumerate(images):
            alone = np.asarray(model(jnp.asarray(image[None])))[0]
            h, w = image.shape[:2]
            assert_close(batched[i, :h, :w], alone, 1e-5, f"image {i} ({h}x{w})")
            assert not np.allclose(unmasked[i, :h, :w], alone, rtol=1e-3)  # without the sizes it would differ
    voc_like = [(375, 500), (500, 375), (333, 500), (500, 333), (375, 499), (366, 500), (281, 500), (500, 400)]
    exact = EvalBatches(TinyDataset(n=len(voc_like)), 1, multiple=1, sizes=voc_like)
    bucketed = EvalBatches(TinyDataset(n=len(voc_like)), 1, multiple=model.size_multiple, sizes=voc_like)
    assert len({s for s, _ in bucketed.batches}) == 6 < len({s for s, _ in exact.batches}) == 8


class _ImagesOfManySizes:
    num_classes, class_names, ignore_index = 3, ("a", "b", "c"), 255
    palette = np.zeros((3, 3), np.uint8)
    SIZES = ((37, 50), (64, 41), (9, 64), (33, 33), (40, 70))

    def __len__(self):
        return len(self.SIZES)

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        h, w = self.SIZES[i]
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 3, (h, w)).astype(np.uint8)

    def image_sizes(self):
        return list(self.SIZES)


@pytest.mark.exhaustive  # CI: tests/test_evaluate.py's bucketed evaluation (the same code for every family)
def test_evaluating_in_padded_batches_equals_evaluating_each_image_alone():
    from fcn_jax.data.pipeline import EvalBatches
    from fcn_jax.devices import make_mesh
    from fcn_jax.inference.evaluation import confusion_over

    model = MODELS["fcn16s_paper"](3, backbone="vgg11", fc_width=NARROW, rngs=nnx.Rngs(0))
    for layer in (model.score_fr, model.score_pool4):
        layer.kernel.set_value(0.05 * jax.random.normal(jax.random.key(1), layer.kernel.shape))
    data, mesh = _ImagesOfManySizes(), make_mesh()
    with jax.default_matmul_precision("highest"):
        alone = confusion_over(model, EvalBatches(data, 1, multiple=1), mesh, 3, 255)
        padded = EvalBatches(data, 2, multiple=model.size_multiple)
        assert len(padded.batches) < len(data)  # images of different sizes share batches
        together = confusion_over(model, padded, mesh, 3, 255)
    np.testing.assert_array_equal(together, alone)
    assert alone.sum() == sum(h * w for h, w in data.SIZES) and (alone.sum(0) > 0).sum() > 1  # varied predictions
