"""The caller owns train/eval mode: evaluation and prediction leave a model in the mode they found."""

from __future__ import annotations

import numpy as np
import pytest

import fcn_jax
from fcn_jax.data import SyntheticShapes
from fcn_jax.inference.evaluation import evaluate_model
from fcn_jax.models.modes import in_mode


@pytest.fixture(scope="module")
def model():
    return fcn_jax.create_model("fcn32s", num_classes=5, backbone="vgg11", batch_norm=True)


def _modes(model) -> set:
    return {model.bn1.use_running_average, model.backbone.bns[0].use_running_average}


@pytest.mark.slow
@pytest.mark.parametrize("train", [True, False])
def test_predict_and_evaluate_leave_the_mode_they_found(model, train):
    model.train() if train else model.eval()
    images = [np.zeros((32, 32, 3), np.uint8), np.full((40, 24, 3), 200, np.uint8)]
    fcn_jax.predict(model, images)
    assert _modes(model) == {not train}
    evaluate_model(model, SyntheticShapes("val", num_samples=2, size=(32, 32)), progress=False)
    assert _modes(model) == {not train}


def test_predict_runs_in_eval_mode_whatever_the_model_is_in(model):
    """Eval mode: the same image gives the same mask alone and in a batch (train-mode BatchNorm would not)."""
    model.train()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    together = fcn_jax.predict(model, images, logits=True)
    alone = fcn_jax.predict(model, images[0], logits=True)
    np.testing.assert_allclose(together[0], alone, rtol=1e-5, atol=1e-5)


def test_in_mode_restores_after_an_error(model):
    model.train()
    with pytest.raises(RuntimeError), in_mode(model, train=False):
        assert _modes(model) == {True}
        raise RuntimeError("inside")
    assert _modes(model) == {False}
