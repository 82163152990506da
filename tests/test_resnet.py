"""torchvision's FCN-ResNet50/101 against torchvision's own modules (random weights, BatchNorm moved off its
defaults): eval and train mode at odd and even sizes, float64 gradients, the state_dict layouts both ways bit
for bit, ImageNet ResNets into the backbone, and the published parameter counts."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fcn_jax
from fcn_jax import registry
from fcn_jax.errors import ConfigError, WeightsError
from fcn_jax.models.summary import summary
from tests.helpers import assert_close, nchw, nhwc

pytest.importorskip("torchvision")


def _pair(arch="fcn_resnet50", *, aux_loss=True, num_classes=5, seed=0, dropout=True, dtype=jnp.float32):
    """torchvision's module with random weights and our model holding them (through the converter)."""
    from fcn_jax.pytorch.resnet_reference import random_torchvision_fcn

    twin = random_torchvision_fcn(arch, num_classes, aux_loss=aux_loss, seed=seed, dropout=dropout)
    if dtype == jnp.float64:
        twin = twin.double()
    model = nnx.eval_shape(lambda: fcn_jax.create_model(arch, num_classes=num_classes, aux_loss=aux_loss,
                                                        dropout=0.1 if dropout else 0.0, dtype=dtype,
                                                        param_dtype=dtype))
    fcn_jax.load_torch_state_dict(model, twin.state_dict())
    return model, twin


@pytest.fixture(scope="module")
def resnet50_pair(torch):
    return _pair()


def _check_heads(model, twin, torch, size, *, batch=2, train=False, rtol=1e-5):
    x = np.random.default_rng(sum(size)).standard_normal((batch, 3, *size)).astype(np.float32)
    twin.train(train)
    model.train() if train else model.eval()
    with torch.no_grad():
        ref = twin(torch.from_numpy(x))
    with jax.default_matmul_precision("highest"):
        out, aux = model(jnp.asarray(nhwc(x)), aux=True)
    for name, ours in (("out", out), ("aux", aux)):
        assert ours.shape == (batch, *size, model.num_classes)
        assert_close(nchw(ours), ref[name].numpy(), rtol, f"{model.arch} {name} {size}")


@pytest.mark.xdist_group("resnet50_pair")
@pytest.mark.slow
@pytest.mark.parametrize("size", [(1, 1), (64, 64), (97, 131)])
def test_eval_matches_torchvision_at_odd_and_even_sizes(resnet50_pair, torch, size):
    _check_heads(*resnet50_pair, torch, size)


@pytest.mark.xdist_group("resnet50_pair")
@pytest.mark.slow
@pytest.mark.parametrize("size", [(33, 200), pytest.param((520, 520), marks=pytest.mark.exhaustive)])
def test_eval_matches_torchvision_at_a_wide_and_the_published_size(resnet50_pair, torch, size):
    _check_heads(*resnet50_pair, torch, size, batch=1 if size == (520, 520) else 2)


@pytest.mark.xdist_group("resnet50_pair")
@pytest.mark.slow
def test_the_onnx_graph_equals_the_model(resnet50_pair):
    """The graph written layer by layer (dilated bottlenecks, the bilinear Resize) in onnxruntime, at two sizes."""
    pytest.importorskip("onnxruntime")
    from fcn_jax.deploy.exporting import default_verify_sizes, export, verify

    model = resnet50_pair[0]
    model.eval()
    checks = verify(model, export(model, "onnx"), "onnx", shapes=default_verify_sizes(model, "onnx", None))
    assert len(checks) == 2 and all(c.ok for c in checks), [c.describe() for c in checks]


@pytest.mark.exhaustive
@pytest.mark.parametrize("size", [(1, 1), (64, 64), (97, 131), (33, 200)])
def test_resnet101_eval_matches_torchvision(torch, size):
    _check_heads(*_pair("fcn_resnet101", seed=1), torch, size)


@pytest.mark.slow
def test_train_mode_uses_batch_statistics_and_updates_the_running_ones_like_torchvision(torch):
    model, twin = _pair(dropout=False, seed=2)
    _check_heads(model, twin, torch, (40, 56), train=True, rtol=1e-4)
    ours = fcn_jax.to_torch_state_dict(model)
    for key, value in twin.state_dict().items():
        if "running" in key or "num_batches_tracked" in key:
            # float32 batch statistics after ~50 layers: layer4's variances measured 1.3e-5 apart
            assert_close(ours[key], value.numpy(), 1e-4, key)


def test_train_mode_without_dropout_keys_says_what_to_pass():
    model = nnx.eval_shape(lambda: fcn_jax.create_model("fcn_resnet50", num_classes=3))  # both checks come first
    with pytest.raises(ConfigError, match=r"rngs=nnx.Rngs\(dropout=key\)"):
        model(jnp.zeros((2, 16, 16, 3)))
    model.eval()
    with pytest.raises(ConfigError, match="aux_loss=True"):
        model(jnp.zeros((1, 16, 16, 3)), aux=True)


@pytest.mark.exhaustive
def test_float64_gradients_match(torch):
    with jax.enable_x64(True):
        model, twin = _pair(dropout=False, seed=3, num_classes=3, dtype=jnp.float64)
        twin.eval()
        model.eval()
        x = np.random.default_rng(3).standard_normal((1, 3, 27, 34))
        w = np.random.default_rng(4).standard_normal((2, 1, 3, 27, 34))
        ref = twin(torch.from_numpy(x))
        ((ref["out"] * torch.from_numpy(w[0])).sum() + (ref["aux"] * torch.from_numpy(w[1])).sum()).backward()

        def objective(model):
            out, aux = model(jnp.asarray(nhwc(x)), aux=True)
            return (out * jnp.asarray(nhwc(w[0]))).sum() + (aux * jnp.asarray(nhwc(w[1]))).sum()

        grads = nnx.grad(objective)(model)
        graphdef, _, stats = nnx.split(model, nnx.Param, ...)
        ours = fcn_jax.to_torch_state_dict(nnx.merge(graphdef, grads, stats))  # the gradients in torch's layout
        for name, param in twin.named_parameters():
            assert_close(ours[name], param.grad.numpy(), 1e-8, name)


def _random_batchnorm_counts(twin, torch):
    with torch.no_grad():
        for i, m in enumerate(m for m in twin.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            m.num_batches_tracked.fill_(1000 + i)
    return twin


@pytest.mark.slow
@pytest.mark.parametrize("aux_loss", [True, False])
def test_the_torchvision_layout_round_trips_bit_for_bit(torch, aux_loss):
    from fcn_jax.pytorch.resnet_reference import random_torchvision_fcn

    twin = _random_batchnorm_counts(random_torchvision_fcn("fcn_resnet50", 21, aux_loss=aux_loss), torch)
    model = nnx.eval_shape(lambda: fcn_jax.create_model("fcn_resnet50", aux_loss=aux_loss))
    report = fcn_jax.load_torch_state_dict(model, twin.state_dict())
    assert len(report.loaded) == (334 if aux_loss else 326) and not report.ignored
    back = fcn_jax.to_torch_state_dict(model, as_torch=True)
    original = twin.state_dict()
    assert list(back) == list(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    twin.load_state_dict(back, strict=True)


@pytest.mark.slow
def test_imagenet_resnets_load_into_the_backbone_and_fc_is_reported_unused(torch):
    from fcn_jax.pytorch.resnet_reference import build_torchvision_resnet

    classifier = build_torchvision_resnet("resnet50")
    sd = classifier.state_dict()
    model = nnx.eval_shape(lambda: fcn_jax.create_model("fcn_resnet50", num_classes=3))
    report = fcn_jax.load_torch_state_dict(model.backbone, sd)
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"] and "fc.weight" in report.notes[0]
    back = fcn_jax.to_torch_state_dict(model.backbone, as_torch=True)
    assert back.keys() == sd.keys() - {"fc.weight", "fc.bias"}
    assert all(torch.equal(back[k], sd[k]) for k in back)

    whole = fcn_jax.create_model("fcn_resnet50", num_classes=3)
    head = np.asarray(whole.classifier.conv4.kernel[...])
    report = fcn_jax.load_torch_state_dict(whole, sd)
    assert "heads keep their initial values" in " ".join(report.notes)
    np.testing.assert_array_equal(np.asarray(whole.backbone.conv1.kernel[...]),
                                  sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(whole.classifier.conv4.kernel[...]), head)


def test_the_aux_head_in_the_file_and_in_the_model(torch):
    from fcn_jax.pytorch.resnet_reference import build_torchvision_fcn

    with_aux = build_torchvision_fcn("fcn_resnet50", 3, aux_loss=True).state_dict()
    plain = nnx.eval_shape(lambda: fcn_jax.create_model("fcn_resnet50", num_classes=3))
    report = fcn_jax.load_torch_state_dict(plain, with_aux)
    assert len(report.ignored) == 8 and all(k.startswith("aux_classifier.") for k in report.ignored)
    assert "aux_loss=True" in report.notes[0]
    without = {k: v for k, v in with_aux.items() if not k.startswith("aux_classifier.")}
    aux = nnx.eval_shape(lambda: fcn_jax.create_model("fcn_resnet50", num_classes=3, aux_loss=True))
    with pytest.raises(WeightsError, match=r"no aux head .* aux_loss=False"):
        fcn_jax.load_torch_state_dict(aux, without)


@pytest.mark.slow
def test_a_file_of_another_family_or_depth_says_what_to_build(torch):
    from fcn_jax.pytorch.reference import build_torch_model
    from fcn_jax.pytorch.resnet_reference import build_torchvision_fcn, build_torchvision_resnet

    resnet = build_torchvision_fcn("fcn_resnet50", 3).state_dict()
    vgg = nnx.eval_shape(lambda: fcn_jax.create_model("fcn8s", num_classes=3, backbone="vgg11"))
    with pytest.raises(WeightsError, match=r"FCN-ResNets.*build fcn_resnet50 instead"):
        fcn_jax.load_torch_state_dict(vgg, resnet)
    paper = nnx.eval_shape(lambda: fcn_jax.create_model("fcn8s_paper", num_classes=3, backbone="vgg11",
                                                        fc_width=64))
    with pytest.raises(WeightsError, match=r"FCN-ResNets.*build fcn_resnet50 instead"):
        fcn_jax.load_torch_state_dict(paper, build_torchvision_resnet("resnet50").state_dict())
    r50 = nnx.eval_shape(lambda: fcn_jax.create_model("fcn_resnet50", num_classes=3))
    with pytest.raises(WeightsError, match=r"tutorial's FCNs.*build fcn32s, fcn16s, fcn8s or fcns instead"):
        fcn_jax.load_torch_state_dict(r50, build_torch_model("fcn8s", 3, "vgg11", False).state_dict())
    deeper = build_torchvision_fcn("fcn_resnet101", 3).state_dict()
    with pytest.raises(WeightsError, match="convert it as that \\(--arch fcn_resnet101\\)"):
        fcn_jax.load_torch_state_dict(r50, deeper)


@pytest.mark.slow
def test_backbone_and_batch_norm_are_fixed_by_the_arch():
    assert registry.family_of("fcn_resnet101").backbones == ("resnet50", "resnet101")
    with pytest.raises(ConfigError, match="built on resnet50 with BatchNorm"):
        fcn_jax.create_model("fcn_resnet50", backbone="resnet101")
    with pytest.raises(ConfigError, match="built on resnet50 with BatchNorm"):
        fcn_jax.create_model("fcn_resnet50", batch_norm=False)
    model = nnx.eval_shape(lambda: fcn_jax.create_model("fcn_resnet101", aux_loss=True))
    assert model.config() == {"arch": "fcn_resnet101", "backbone": "resnet101", "batch_norm": True,
                              "num_classes": 21, "aux_loss": True}


@pytest.mark.slow
@pytest.mark.parametrize("arch, aux_loss, count", [("fcn_resnet50", True, 35_322_218),
                                                   ("fcn_resnet50", False, 32_957_013),
                                                   ("fcn_resnet101", True, 54_314_346)])
def test_the_published_parameter_counts(arch, aux_loss, count):
    model = nnx.eval_shape(lambda: fcn_jax.create_model(arch, num_classes=21, aux_loss=aux_loss))
    assert f"{count:,} trainable parameters" in summary(model)


@pytest.mark.slow
def test_one_sgd_step_with_the_aux_loss_and_the_aux_head_at_10x_matches_torchvisions_recipe(torch):
    """CE(out) + 0.5 CE(aux), SGD momentum 0.9, weight decay 1e-4, the aux head a parameter group at 10x the lr."""
    import functools

    import optax

    from fcn_jax.training.losses import cross_entropy
    from fcn_jax.training.optim import make_optimizer
    from fcn_jax.training.step import train_step

    model, twin = _pair(dropout=False, seed=5, num_classes=3)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 36, 44)).astype(np.float32)
    y = rng.integers(0, 3, (2, 36, 44))
    y[:, :5, :7] = 255
    lr, before = 0.01, fcn_jax.to_torch_state_dict(model)
    groups = [{"params": twin.backbone.parameters()}, {"params": twin.classifier.parameters()},
              {"params": twin.aux_classifier.parameters(), "lr": 10 * lr}]
    sgd = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=1e-4)
    result = twin.train()(torch.from_numpy(x))
    ce = functools.partial(torch.nn.functional.cross_entropy, target=torch.from_numpy(y), ignore_index=255)
    loss = ce(result["out"]) + 0.5 * ce(result["aux"])
    loss.backward()
    sgd.step()

    model.train()
    tx = make_optimizer("sgd", optax.constant_schedule(lr), momentum=0.9, weight_decay=1e-4,
                        lr_factors={"aux_classifier": 10.0})
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    with jax.default_matmul_precision("highest"):
        ours = train_step(model, optimizer, jnp.asarray(nhwc(x)), jnp.asarray(y),
                          functools.partial(cross_entropy, ignore_index=255), aux_weight=0.5)
    assert_close(np.asarray(ours), loss.item(), 1e-5, "loss")
    after, theirs = fcn_jax.to_torch_state_dict(model), twin.state_dict()
    for key in ("classifier.4.weight", "classifier.4.bias", "aux_classifier.4.weight", "aux_classifier.4.bias",
                "aux_classifier.0.weight"):
        # the heads' updates (a wrong factor or weight would be off by 100s of %); float32, through 50 layers
        assert_close(after[key] - before[key], theirs[key].numpy() - before[key], 1e-3, key)


def test_summary_prints_the_published_count(capsys):
    from fcn_jax.cli import main

    assert main(["summary", "--arch", "fcn_resnet101", "--aux-loss"]) == 0
    assert "54,314,346 trainable parameters" in capsys.readouterr().out


# 90 s; CI: the layouts (test_the_torchvision_layout_round_trips_bit_for_bit), the recipe's step (test_one_sgd_step...),
# the ONNX graph (test_the_onnx_graph_equals_the_model), every command through the registry (test_architecture.py)
@pytest.mark.exhaustive
def test_every_command_takes_the_resnet_archs(torch, tmp_path, capsys):
    """convert (whole file, verified; ImageNet backbone), train from the backbone, evaluate, predict, export; heatmap
    refuses; all in this process, on tiny inputs."""
    from PIL import Image

    from fcn_jax.cli import main
    from fcn_jax.pytorch.resnet_reference import build_torchvision_resnet, random_torchvision_fcn

    torch.save(random_torchvision_fcn("fcn_resnet50", 4, aux_loss=True).state_dict(), tmp_path / "r50.pth")
    torch.save(build_torchvision_resnet("resnet50").state_dict(), tmp_path / "in50.pth")
    weights, backbone = tmp_path / "r50.safetensors", tmp_path / "in50.safetensors"
    assert main(["convert", "--input", str(tmp_path / "r50.pth"), "--output", str(weights), "--verify",
                 "--verify-size", "33x40"]) == 0
    assert "verify aux" in capsys.readouterr().out
    assert main(["convert", "--input", str(tmp_path / "in50.pth"), "--output", str(backbone)]) == 0
    assert fcn_jax.load_model(weights).config()["aux_loss"] and fcn_jax.load_model(backbone).name == "resnet50"

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, size in enumerate([(21, 30), (40, 17)]):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size, 3), np.uint8)).save(photos / f"{i}.png")
    assert main(["predict", str(weights), str(photos), "--output", str(tmp_path / "out"), "--no-progress",
                 "--workers", "0"]) == 0
    assert Image.open(tmp_path / "out" / "1_mask.png").size == (17, 40)
    assert main(["export", str(weights), "--format", "onnx", "--output", str(tmp_path / "r50.onnx")]) == 0
    assert main(["heatmap", str(weights), str(photos / "0.png"), "--output", str(tmp_path / "h.png")]) == 2
    assert "not the heatmap model" in capsys.readouterr().err

    # torchvision's recipe end to end (SGD, poly, aux loss and lr factor, shorter side drawn then cropped, validation
    # resized), on tiny synthetic images
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--preset", "voc-fcn-resnet50", "--dataset", "synthetic", "--train-split", "train",
                 "--backbone-weights", str(backbone), "--synthetic-size", "24", "--synthetic-train", "4",
                 "--synthetic-val", "2", "--batch-size", "2", "--epochs", "1", "--resize-shorter", "16,40",
                 "--crop", "24x24", "--val-resize-shorter", "28", "--workers", "0", "--overlays", "0",
                 "--no-progress", "--run-dir", str(run)]) == 0
    assert "for --batch-size 2 the linear rule gives --lr 0.00125" in capsys.readouterr().err
    trained = fcn_jax.load_model(run / "final.safetensors")
    assert trained.config()["aux_loss"] and trained.backbone.name == "resnet50"
    config = json.loads((run / "config.json").read_text())
    assert (config["optimizer"], config["schedule"], config["aux_weight"], config["resize_shorter"]) == \
        ("sgd", "poly", 0.5, [16, 40])
    assert main(["evaluate", str(run), "--no-progress", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "2 images, resized to a shorter side of 28" in out and "mean IoU" in out


@pytest.mark.slow
def test_the_torchvision_presets_follow_its_recipe(caplog):
    from fcn_jax.training.config import resolve_config

    for preset, arch, dataset, splits in (("coco-fcn-resnet50", "fcn_resnet50", "coco", ("train2017", "val2017")),
                                          ("coco-fcn-resnet101", "fcn_resnet101", "coco", ("train2017", "val2017")),
                                          ("voc-fcn-resnet50", "fcn_resnet50", "voc", ("train_aug", "val"))):
        c = resolve_config(preset, data_dir="data")
        assert (c.arch, c.backbone, c.dataset, (c.train_split, c.val_split)) == (arch, arch[4:], dataset, splits)
        assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.batch_size) == ("sgd", 0.02, 0.9, 1e-4, 32)
        assert (c.schedule, c.power, c.warmup_steps, c.epochs) == ("poly", 0.9, 0, 30)
        assert (c.aux_weight, c.aux_lr_factor, c.decay_biases, c.bias_lr_factor) == (0.5, 10.0, True, 1.0)
        assert (c.resize_shorter, c.crop, c.hflip, c.val_resize_shorter) == ((260, 1040), (480, 480), True, 520)
        assert c.backbone_weights == f"{arch[4:]}.safetensors" and c.loss == "cross_entropy"
    assert not caplog.records
    assert resolve_config("coco-fcn-resnet50", batch_size=8).lr == 0.02  # suggested, never applied
    assert "for --batch-size 8 the linear rule gives --lr 0.005" in caplog.text


@pytest.mark.exhaustive
def test_stablehlo_export_and_compare(tmp_path, capsys):
    from fcn_jax.cli import main

    fcn_jax.save_weights(fcn_jax.create_model("fcn_resnet50", num_classes=3, aux_loss=True), tmp_path / "r.safetensors")
    assert main(["export", str(tmp_path / "r.safetensors"), "--format", "stablehlo",
                 "--output", str(tmp_path / "r.jaxexport")]) == 0
    assert main(["compare", "--arch", "fcn_resnet50", "--size", "32x48", "--no-speed", "--no-progress"]) == 0
    assert "all fidelity checks within tolerance" in capsys.readouterr().out
