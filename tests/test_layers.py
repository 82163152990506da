"""Each layer of fcn_jax.models.layers against its torch.nn counterpart."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcn_jax.errors import ConfigError, InputError
from fcn_jax.models.layers import BatchNorm2d, Conv2d, ConvTranspose2d, max_pool_2x2
from tests.helpers import assert_close, nchw, nhwc

RTOL = 1e-5


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _twin(layer_class, ref, *args, **kwargs):
    """Our layer holding torch layer ``ref``'s weights; built shapes only, as a random initialisation would compile
    a program for each kernel shape (~0.5 s each here) only to be written over."""
    ours = nnx.eval_shape(lambda: layer_class(*args, rngs=nnx.Rngs(0), **kwargs))
    ours.kernel.set_value(jnp.asarray(ref.weight.detach().numpy().transpose(2, 3, 1, 0)))
    ours.bias.set_value(jnp.asarray(ref.bias.detach().numpy()))
    return ours


@nnx.jit
def _forward(layer, x):
    """``layer(x)`` as one compiled program (eagerly, each operation is compiled on its own)."""
    return layer(x)


@pytest.mark.slow
@pytest.mark.parametrize("k,s,p,d", [(3, 1, 1, 1), (1, 1, 0, 1), (3, 2, 0, 1), (5, 1, 2, 2), (3, 3, 2, 1)])
def test_conv2d_matches_torch(torch, k, s, p, d):
    ref = torch.nn.Conv2d(4, 6, k, stride=s, padding=p, dilation=d)
    ours = _twin(Conv2d, ref, 4, 6, k, stride=s, padding=p, dilation=d)
    x = _x((2, 4, 13, 17))
    with torch.no_grad():
        assert_close(nchw(_forward(ours, jnp.asarray(nhwc(x)))), ref(torch.from_numpy(x)).numpy(), RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("h,w,p", [(9, 9, 0), (14, 11, 0), (7, 7, 0), (5, 6, 2)])
def test_large_kernels_over_small_maps_are_one_matrix_product_and_match_torch(torch, h, w, p):
    """fc6's case (a 7x7 kernel, a map a few pixels larger): computed as patches x kernel, forward and gradients."""
    ref = torch.nn.Conv2d(5, 8, 7, padding=p).double()
    with jax.enable_x64(True):
        ours = _twin(Conv2d, ref, 5, 8, 7, padding=p, dtype=jnp.float64, param_dtype=jnp.float64)
        assert ours._by_patches(h, w, 7, 7) and not Conv2d(5, 8, 3, rngs=nnx.Rngs(0))._by_patches(h, w, 3, 3)
        x = _x((2, 5, h, w)).astype(np.float64)
        tx = torch.from_numpy(x).requires_grad_()
        out = ref(tx)
        (out ** 2).sum().backward()
        layer_grads, x_grad = nnx.jit(nnx.grad(lambda m, x: (m(x) ** 2).sum(), argnums=(0, 1)))(
            ours, jnp.asarray(nhwc(x)))
        assert_close(nchw(_forward(ours, jnp.asarray(nhwc(x)))), out.detach().numpy(), 1e-12)
        assert_close(layer_grads["kernel"][...], ref.weight.grad.numpy().transpose(2, 3, 1, 0), 1e-12)
        assert_close(nchw(x_grad), tx.grad.numpy(), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("h,w", [(1, 1), (1, 2), (2, 2), (2, 4), (4, 2)])
@pytest.mark.parametrize("k,s,p,d", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2)])
def test_conv2d_small_inputs_match_torch(torch, h, w, k, s, p, d):
    """Inputs with fewer pixels than the kernel take the zero-extend-then-crop path: values, input,
    kernel and bias gradients against torch's autograd in float64."""
    ref = torch.nn.Conv2d(3, 5, k, stride=s, padding=p, dilation=d).double()
    x = torch.from_numpy(_x((2, 3, h, w)).astype(np.float64)).requires_grad_()
    y = ref(x)
    cot = np.random.default_rng(1).standard_normal(tuple(y.shape))
    (y * torch.from_numpy(cot)).sum().backward()
    with jax.enable_x64(True):
        ours = _twin(Conv2d, ref, 3, 5, k, stride=s, padding=p, dilation=d, dtype=jnp.float64,
                     param_dtype=jnp.float64)
        xj = jnp.asarray(nhwc(x.detach().numpy()))
        out = _forward(ours, xj)
        grads, dx = nnx.jit(nnx.grad(lambda layer, xx: jnp.sum(layer(xx) * jnp.asarray(nhwc(cot))),
                                     argnums=(0, 1)))(ours, xj)
    assert_close(nchw(out), y.detach().numpy(), 1e-10, "values and shape")
    assert_close(nchw(dx), x.grad.numpy(), 1e-10, "input gradient")
    assert_close(np.asarray(grads["kernel"][...]).transpose(3, 2, 0, 1), ref.weight.grad.numpy(), 1e-10, "kernel")
    assert_close(grads["bias"][...], ref.bias.grad.numpy(), 1e-10, "bias")


@pytest.mark.slow
def test_conv2d_small_inputs_keep_xla_from_swapping_operands():
    """On a 2x4 input XLA would swap the convolution's operands (a reversed-kernel window) and its CPU
    backend would run that ~50x slower; the zero-extended input keeps the ordinary convolution, also
    in the backward pass."""
    layer = nnx.eval_shape(lambda: Conv2d(16, 16, 3, padding=1, rngs=nnx.Rngs(0)))  # only compiled, never run
    x = jnp.ones((2, 2, 4, 16))
    grad = nnx.grad(lambda m, xx: m(xx).sum(), argnums=(0, 1))
    for fn in (lambda m, xx: m(xx), grad):
        hlo = nnx.jit(fn).lower(layer, x).compile().as_text()
        convolutions = [line for line in hlo.splitlines() if " convolution(" in line]
        assert convolutions and not any("rhs_reversal" in line for line in convolutions), convolutions


TRANSPOSE_SETTINGS = [(k, s, p, op, d) for k, s, p, op, d in itertools.product((1, 2, 3, 4), (1, 2, 3), (0, 1, 2),
                                                                                (0, 1, 2), (1, 2))
                      if op < max(s, d) and p <= d * (k - 1)]
# The FCN decoder's setting and three others (odd/even kernels, strides 1-3, dilation): the fast tier's share.
TRANSPOSE_FAST = {(3, 2, 1, 1, 1), (4, 3, 2, 2, 1), (3, 1, 1, 0, 2), (1, 2, 0, 1, 1)}
# The cover `make test` runs: every kernel size, stride, padding, output padding and dilation, at their edges
# (1x1 kernels, padding up to d * (k - 1), output padding up to max(s, d) - 1); the whole grid is exhaustive.
TRANSPOSE_COVER = TRANSPOSE_FAST | {(1, 1, 0, 0, 1), (1, 3, 0, 2, 1), (2, 2, 0, 0, 1), (2, 2, 1, 1, 1), (2, 1, 2, 1, 2),
                                    (3, 3, 0, 2, 1), (3, 3, 2, 0, 1), (3, 1, 2, 0, 1), (4, 1, 0, 0, 1), (4, 2, 2, 1, 2),
                                    (4, 3, 1, 0, 2)}
assert set(TRANSPOSE_SETTINGS) >= TRANSPOSE_COVER


def _tiered(settings, fast: set, cover: set):
    """``fast``: every tier; ``cover``: `make test` (slow); the rest: `make test-exhaustive`."""
    return [pytest.param(*t, marks=() if t in fast else pytest.mark.slow if t in cover else pytest.mark.exhaustive)
            for t in settings]


@pytest.mark.slow
@pytest.mark.parametrize("k,s,p,op,d", _tiered(TRANSPOSE_SETTINGS, TRANSPOSE_COVER, TRANSPOSE_COVER))
def test_conv_transpose2d_matches_torch(torch, k, s, p, op, d):
    ref = torch.nn.ConvTranspose2d(3, 5, k, stride=s, padding=p, output_padding=op, dilation=d)
    ours = _twin(ConvTranspose2d, ref, 3, 5, k, stride=s, padding=p, output_padding=op, dilation=d)
    x = _x((2, 3, 7, 6))
    with torch.no_grad():
        assert_close(nchw(_forward(ours, jnp.asarray(nhwc(x)))), ref(torch.from_numpy(x)).numpy(), RTOL,
                     "values and shape")


def _check_conv_transpose_float64(torch, k, s, p, op, d, h, w, rtol=1e-10):
    """Values, input, kernel and bias gradients of ours against torch's autograd, float64."""
    ref = torch.nn.ConvTranspose2d(3, 5, k, stride=s, padding=p, output_padding=op, dilation=d).double()
    x = torch.from_numpy(_x((2, 3, h, w)).astype(np.float64)).requires_grad_()
    y = ref(x)
    cot = np.random.default_rng(1).standard_normal(tuple(y.shape))
    (y * torch.from_numpy(cot)).sum().backward()
    with jax.enable_x64(True):
        ours = _twin(ConvTranspose2d, ref, 3, 5, k, stride=s, padding=p, output_padding=op, dilation=d,
                     dtype=jnp.float64, param_dtype=jnp.float64)
        xj = jnp.asarray(nhwc(x.detach().numpy()))

        def f(layer, xx):
            return jnp.sum(layer(xx) * jnp.asarray(cot.transpose(0, 2, 3, 1)))

        out = _forward(ours, xj)
        grads, dx = nnx.jit(nnx.grad(f, argnums=(0, 1)))(ours, xj)
    assert_close(nchw(out), y.detach().numpy(), rtol, "values and shape")
    assert_close(nchw(dx), x.grad.numpy(), rtol, "input gradient")
    assert_close(np.asarray(grads["kernel"][...]).transpose(3, 2, 0, 1), ref.weight.grad.numpy(), rtol, "kernel")
    assert_close(grads["bias"][...], ref.bias.grad.numpy(), rtol, "bias")


@pytest.mark.parametrize("k,s,p,op,d", _tiered(TRANSPOSE_SETTINGS, TRANSPOSE_FAST, TRANSPOSE_COVER))
def test_conv_transpose2d_gradients_match_torch(torch, k, s, p, op, d):
    """The custom VJP (gradients through the strided forward conv) against torch's autograd, float64."""
    _check_conv_transpose_float64(torch, k, s, p, op, d, 7, 6)


@pytest.mark.slow
@pytest.mark.parametrize("h,w", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("k,s,p,op,d", [(3, 2, 1, 1, 1), (1, 2, 0, 1, 1), (4, 3, 2, 2, 1), (3, 1, 1, 0, 2)])
def test_conv_transpose2d_small_inputs_match_torch(torch, h, w, k, s, p, op, d):
    """Inputs under 3x3 take the zero-pad-then-crop path (XLA's CPU backend is slow on them)."""
    _check_conv_transpose_float64(torch, k, s, p, op, d, h, w)


@pytest.mark.slow
def test_fcn_deconv_doubles_size_and_same_padding_would_not_match(torch):
    """The FCN deconv (k3 s2 p1 op1) maps H -> 2H; Flax's padding="SAME" has that shape but is
    shifted by one pixel, which is why ConvTranspose2d uses explicit padding."""
    ref = torch.nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
    x = _x((1, 4, 5, 7))
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    assert want.shape[2:] == (10, 14)
    flax_same = nnx.ConvTranspose(4, 4, (3, 3), strides=(2, 2), padding="SAME", transpose_kernel=True,
                                  rngs=nnx.Rngs(0))
    flax_same.kernel[...] = jnp.asarray(ref.weight.detach().numpy().transpose(2, 3, 1, 0))
    flax_same.bias[...] = jnp.asarray(ref.bias.detach().numpy())
    shifted = nchw(flax_same(jnp.asarray(nhwc(x))))
    assert shifted.shape == want.shape and np.abs(shifted - want).max() > 1e-2


def test_conv_transpose_rejects_output_padding_too_large():
    with pytest.raises(ConfigError, match="output_padding"):
        ConvTranspose2d(2, 2, 3, stride=2, output_padding=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (3, 5)])
def test_max_pool_matches_torch_including_odd_sizes(torch, h, w):
    x = _x((2, 3, h, w))
    ref = torch.nn.MaxPool2d(2, 2)(torch.from_numpy(x)).numpy()
    out = nchw(max_pool_2x2(jnp.asarray(nhwc(x))))
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("h,w", [(8, 8), (7, 9), (3, 5)])
def test_max_pool_gradient_matches_torch_with_ties(torch, h, w):
    """Ties (windows of zeros after ReLU, repeated values) send the whole gradient to the first
    maximum in row-major order, as torch does; dropped odd rows/columns get zero gradient."""
    rng = np.random.default_rng(1)
    x = rng.integers(-1, 2, (2, 3, h, w)).astype(np.float64)  # -1, 0, 1: many ties
    x[0, 0] = np.maximum(x[0, 0], 0)  # ReLU-like windows of zeros
    dy = rng.standard_normal((2, 3, h // 2, w // 2))
    xt = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.max_pool2d(xt, 2, 2).backward(torch.from_numpy(dy))
    with jax.enable_x64(True):
        _, vjp = jax.vjp(max_pool_2x2, jnp.asarray(nhwc(x)))
        (dx,) = vjp(jnp.asarray(nhwc(dy)))
    np.testing.assert_array_equal(nchw(dx), xt.grad.numpy())


@pytest.mark.slow
def test_max_pool_gradient_under_jit_matches_autodiff_float32(monkeypatch):
    """Under jit XLA recomputes the pool's input (conv -> BatchNorm -> ReLU) inside backward fusions
    with different rounding; the gradient must still reach every window's maximum, as autodiff of
    reduce_window routes it. (Finding the maximum again by equality lost ~60% of a VGG16-BN first-layer
    gradient at 224x224 in float32.)"""
    import fcn_jax.models.vgg as vgg

    def reduce_window_pool(h):
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 64, 64, 3)), jnp.float32)

    def grads():
        model = vgg.VGGBackbone("vgg11", batch_norm=True, rngs=nnx.Rngs(0))

        def loss(m):
            return sum(jnp.sum(v * jnp.cos(jnp.arange(v.size).reshape(v.shape))) for v in m(x).values())

        return nnx.jit(nnx.grad(loss))(model)

    ours = grads()
    monkeypatch.setattr(vgg, "max_pool_2x2", reduce_window_pool)
    ref = grads()
    for path, g in nnx.to_flat_state(ref):
        assert_close(dict(nnx.to_flat_state(ours))[path][...], g[...], 1e-4, str(path))


def test_max_pool_keeps_bfloat16():
    assert max_pool_2x2(jnp.ones((1, 4, 4, 2), jnp.bfloat16)).dtype == jnp.bfloat16


def _bn_pair(torch, c=6, seed=0):
    from fcn_jax.pytorch.reference import randomize_batchnorm_

    ref = randomize_batchnorm_(torch.nn.BatchNorm2d(c), seed)
    ours = BatchNorm2d(c)
    for flax_name, torch_name in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                                  ("var", "running_var"), ("num_batches_tracked", "num_batches_tracked")):
        getattr(ours, flax_name)[...] = jnp.array(getattr(ref, torch_name).detach().numpy())
    return ref, ours


def test_batchnorm_train_mode_and_running_stats_match_torch(torch):
    """Three train steps with n = 2*3*2 = 12 values per channel: outputs and the running statistics
    (unbiased variance, momentum 0.1) follow torch; nnx.BatchNorm's biased update would not."""
    ref, ours = _bn_pair(torch)
    for step in range(3):
        x = _x((2, 6, 3, 2), seed=step) * 3 + 1
        out = ours(jnp.asarray(nhwc(x)))
        assert_close(nchw(out), ref(torch.from_numpy(x)).detach().numpy(), RTOL, f"step {step}")
    assert_close(ours.mean[...], ref.running_mean.numpy(), RTOL, "running mean")
    assert_close(ours.var[...], ref.running_var.numpy(), RTOL, "running var")
    assert int(ours.num_batches_tracked[...]) == int(ref.num_batches_tracked)


def test_batchnorm_eval_mode_uses_running_stats_and_does_not_update(torch):
    ref, ours = _bn_pair(torch, seed=1)
    ref.eval(), ours.eval()
    before = np.asarray(ours.var[...]).copy()
    x = _x((2, 6, 4, 4)) * 2 - 1
    with torch.no_grad():
        assert_close(nchw(ours(jnp.asarray(nhwc(x)))), ref(torch.from_numpy(x)).numpy(), RTOL)
    np.testing.assert_array_equal(ours.var[...], before)


def test_batchnorm_bfloat16_compute_keeps_float32_statistics():
    bn = BatchNorm2d(4, dtype=jnp.bfloat16)
    y = bn(jnp.asarray(_x((2, 5, 5, 4)), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and bn.mean[...].dtype == jnp.float32 and bn.var[...].dtype == jnp.float32
    assert np.all(np.asarray(bn.var[...]) != 1.0)


def test_batchnorm_under_jit_updates_statistics():
    bn = BatchNorm2d(3)

    @nnx.jit
    def step(bn, x):
        return bn(x)

    step(bn, jnp.asarray(_x((2, 4, 4, 3))))
    assert int(bn.num_batches_tracked[...]) == 1 and np.abs(np.asarray(bn.mean[...])).max() > 0


def test_batchnorm_train_mode_needs_two_values_per_channel():
    with pytest.raises(InputError, match="more than 1 value per channel"):
        BatchNorm2d(3)(jnp.ones((1, 1, 1, 3)))


@pytest.mark.slow
def test_precision_argument_reaches_the_convolution():
    conv = Conv2d(2, 2, 3, padding=1, precision=jax.lax.Precision.HIGHEST, rngs=nnx.Rngs(0))
    assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in str(jax.make_jaxpr(conv)(jnp.ones((1, 4, 4, 2))))
