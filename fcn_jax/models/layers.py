"""Layers with PyTorch's numerics, in NHWC.

Each layer matches its ``torch.nn`` counterpart exactly (up to float rounding) once the weights are
converted with :mod:`fcn_jax.convert`. Kernels use Flax's layouts:

- :class:`Conv2d`: kernel ``(kh, kw, in, out)`` = torch ``weight.permute(2, 3, 1, 0)``.
- :class:`ConvTranspose2d`: kernel ``(kh, kw, out, in)`` = torch ``weight.permute(2, 3, 1, 0)``
  (torch stores transposed-conv weights as ``(in, out, kh, kw)``), the layout of Flax's
  ``ConvTranspose(transpose_kernel=True)``.
- :class:`BatchNorm2d`: ``scale, bias`` (params), ``mean, var, num_batches_tracked`` (batch stats).

``precision`` is passed to XLA's convolutions. ``None`` means the backend default, which is exact fp32
on CPU and GPU but one bf16 pass on TPU; use ``"highest"`` (or ``jax.default_matmul_precision``)
where fp32 results must match PyTorch on TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fcn_jax.errors import ConfigError, InputError

_NHWC = ("NHWC", "HWIO", "NHWC")
DEFAULT_KERNEL_INIT = nnx.initializers.kaiming_normal()
MIN_DECONV_INPUT = 3  # see conv_transpose


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class Conv2d(nnx.Module):
    """``torch.nn.Conv2d`` (zero padding, no groups): ``(N, H, W, in) -> (N, H', W', out)``."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1, use_bias: bool = True,
                 kernel_init=DEFAULT_KERNEL_INIT, dtype=jnp.float32,
                 param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
        kh, kw = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.dtype, self.precision = dtype, precision
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)

        def conv(inputs):
            return jax.lax.conv_general_dilated(
                inputs, kernel, window_strides=self.stride, padding=[(p, p) for p in self.padding],
                rhs_dilation=self.dilation, dimension_numbers=_NHWC, precision=self.precision)

        x = x.astype(self.dtype)
        (h, w), (kh, kw) = x.shape[1:3], kernel.shape[:2]
        if known_sizes(h, w) and self._by_patches(h, w, kh, kw):
            y = _conv_by_patches(x, kernel, self.padding, self.precision)
        elif not known_sizes(h, w) or h * w >= kh * kw:
            y = conv(x)
        else:
            # XLA swaps the operands of a convolution whose input has fewer pixels than its kernel (VGG's
            # block 5 on a 32x64 image is 2x4) and its CPU backend runs that ~50x slower. Zero rows and
            # columns appended up to the kernel size leave the outputs that are kept unchanged. The
            # barriers stop XLA from folding the padding back into the convolution, forward and backward.
            out_h, out_w = jax.eval_shape(conv, x).shape[1:3]
            y = conv(jax.lax.optimization_barrier(_zero_extend(x, (max(kh - h, 0), max(kw - w, 0)))))
            y = jax.lax.optimization_barrier(y)[:, :out_h, :out_w]
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)

    def _by_patches(self, h: int, w: int, kh: int, kw: int) -> bool:
        """Whether to compute this convolution as one matrix product (:func:`_conv_by_patches`): for the paper
        nets' fc6, a 7x7 kernel over a map a few pixels larger, XLA's CPU weight gradient is ~15x slower than
        the product (FCN-8s at a 64x64 image, 3x3 outputs: fc6's backward 4.96 -> 0.35 s)."""
        out = (h + 2 * self.padding[0] - kh + 1) * (w + 2 * self.padding[1] - kw + 1)
        return kh * kw >= 49 and 0 < out <= 1024 and self.stride == (1, 1) and self.dilation == (1, 1)


def _conv_by_patches(x: jax.Array, kernel: jax.Array, padding: tuple[int, int], precision) -> jax.Array:
    """A stride-1 convolution as one matrix product: the input's patches, one row per output pixel in the
    kernel's (kh, kw, in) order, times the kernel as a (kh * kw * in, out) matrix. Equal to the convolution up
    to the order of the float sums (1e-6 relative in float32)."""
    kh, kw, cin, cout = kernel.shape
    x = jnp.pad(x, ((0, 0), (padding[0], padding[0]), (padding[1], padding[1]), (0, 0)))
    n, h, w, _ = x.shape
    oh, ow = h - kh + 1, w - kw + 1
    patches = jnp.stack([x[:, i:i + kh, j:j + kw] for i in range(oh) for j in range(ow)], axis=1)
    y = jnp.dot(patches.reshape(n, oh * ow, kh * kw * cin), kernel.reshape(kh * kw * cin, cout), precision=precision)
    return y.reshape(n, oh, ow, cout)


def known_sizes(*sizes) -> bool:
    """True when every size is a number, False when one is symbolic (a program exported for any size, see
    :mod:`fcn_jax.deploy.exporting`): the CPU workarounds that depend on a size are then left out."""
    return all(isinstance(s, int) for s in sizes)


def _zero_extend(x: jax.Array, extra: tuple[int, int]) -> jax.Array:
    """``x`` (NHWC) with ``extra`` zero rows and columns appended."""
    return jnp.pad(x, ((0, 0), (0, extra[0]), (0, extra[1]), (0, 0)))


class ConvTranspose2d(nnx.Module):
    """``torch.nn.ConvTranspose2d`` (no groups): ``(N, H, W, in) -> (N, H', W', out)`` with
    ``H' = (H - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1``.

    Computed as a stride-1 convolution of the input dilated by ``stride`` with the spatially flipped
    kernel and the explicit padding ``(d(k-1) - p, d(k-1) - p + output_padding)`` per axis. Flax's
    ``padding="SAME"`` gives the same shape but is shifted by one pixel, so it is not used.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, output_padding: int = 0, dilation: int = 1, use_bias: bool = True,
                 kernel_init=DEFAULT_KERNEL_INIT, dtype=jnp.float32,
                 param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
        kh, kw = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        padding, output_padding = _pair(padding), _pair(output_padding)
        if any(op >= max(s, d) for op, s, d in zip(output_padding, self.stride, self.dilation, strict=True)):
            raise ConfigError(f"output_padding {output_padding} must be smaller than stride "
                             f"{self.stride} or dilation {self.dilation}, as in PyTorch")
        self.padding = tuple(
            (d * (k - 1) - p, d * (k - 1) - p + op)
            for k, p, op, d in zip((kh, kw), padding, output_padding, self.dilation, strict=True))
        self.dtype, self.precision = dtype, precision
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, out_features, in_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv_transpose(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride,
                           self.padding, self.dilation, self.precision)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def _strided_conv(g, kernel, stride, padding, dilation, precision, out_hw):
    """The forward convolution F whose adjoint (transpose) is the transposed convolution: from the
    transposed conv's output space back to its input space (of spatial size ``out_hw``), with the
    stored (kh, kw, out, in) kernel read as HWIO. ``padding`` is the transposed conv's ((lo, hi), ...)."""
    k_eff = [d * (kernel.shape[i] - 1) for i, d in enumerate(dilation)]
    pads = [(k - lo, k - lo) for k, (lo, _) in zip(k_eff, padding, strict=True)]  # the forward conv's symmetric p
    y = jax.lax.conv_general_dilated(g, kernel, window_strides=stride, padding=pads, rhs_dilation=dilation,
                                     dimension_numbers=_NHWC, precision=precision)
    return y[:, :out_hw[0], :out_hw[1]]  # output_padding >= stride leaves windows past the input


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_transpose(x, kernel, stride, padding, dilation, precision):
    """Transposed convolution, NHWC, kernel (kh, kw, out, in), explicit ((lo, hi), ...) padding.

    Forward: a stride-1 convolution of the stride-dilated input with the flipped kernel. Backward
    (custom): both gradients come from the strided forward conv F that this is the transpose of,
    ``dx = F(dy)`` and ``dkernel`` = F's kernel gradient at cotangent x. Autodiff would instead take
    the kernel gradient through the input-dilated convolution, which XLA's CPU backend runs about
    35x slower. Exact up to float rounding; the fidelity tests compare it with PyTorch in float64.
    """
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # (kh, kw, out, in) -> flipped (kh, kw, in, out)
    # XLA's CPU backend falls back to a ~50x slower convolution for inputs under 3x3 (x5 of a 64x64 image
    # is 2x2). Zero rows/columns appended to the input add nothing to the output, which is cropped back.
    h, w = x.shape[1:3]
    small = (max(MIN_DECONV_INPUT - h, 0), max(MIN_DECONV_INPUT - w, 0)) if known_sizes(h, w) else (0, 0)
    if any(small):
        x = _zero_extend(x, small)
    y = jax.lax.conv_general_dilated(x, flipped, window_strides=(1, 1), padding=padding, lhs_dilation=stride,
                                     rhs_dilation=dilation, dimension_numbers=_NHWC, precision=precision)
    return y[:, :y.shape[1] - small[0] * stride[0], :y.shape[2] - small[1] * stride[1]]


def _conv_transpose_fwd(x, kernel, stride, padding, dilation, precision):
    return conv_transpose(x, kernel, stride, padding, dilation, precision), (x, kernel)


def _conv_transpose_bwd(stride, padding, dilation, precision, residuals, dy):
    x, kernel = residuals
    # F(dy) is both dx and the primal of F's kernel VJP: one convolution, not two.
    dx, kernel_vjp = jax.vjp(lambda k: _strided_conv(dy, k, stride, padding, dilation, precision, x.shape[1:3]),
                             kernel)
    (dkernel,) = kernel_vjp(x)
    return dx, dkernel


conv_transpose.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


class BatchNorm2d(nnx.Module):
    """``torch.nn.BatchNorm2d`` over the channel (last) axis of NHWC input.

    Train mode (``use_running_average=False``, the default, as in PyTorch) normalises with the batch
    mean and biased batch variance and updates ``mean <- (1 - m) mean + m batch_mean`` and
    ``var <- (1 - m) var + m batch_var * n / (n - 1)`` (the *unbiased* variance, as PyTorch does;
    ``flax.nnx.BatchNorm`` uses the biased one), with PyTorch's momentum ``m = 0.1``. Under ``jit``
    with a batch sharded over devices the statistics are over the global batch (SyncBatchNorm).

    Statistics are computed and kept in ``param_dtype`` (float32 by default) even when ``dtype`` is
    bfloat16, so mixed precision does not degrade the running averages.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
                 use_running_average: bool = False, dtype=jnp.float32, param_dtype=jnp.float32):
        self.momentum, self.epsilon = momentum, epsilon
        self.use_running_average = use_running_average
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))
        # Unused by the maths (momentum is fixed) but kept so torch -> JAX -> torch is exact.
        self.num_batches_tracked = nnx.BatchStat(jnp.asarray(0))  # int32, or int64 under x64

    def __call__(self, x: jax.Array) -> jax.Array:
        stats_dtype = jnp.promote_types(self.mean[...].dtype, x.dtype)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            n = x.size // x.shape[-1]
            if n < 2:
                raise InputError(f"BatchNorm2d in train mode needs more than 1 value per channel, got "
                                 f"input shape {x.shape}; use a larger batch or model.eval()")
            xs = x.astype(stats_dtype)
            mean = xs.mean(axis=(0, 1, 2))
            var = jnp.square(xs - mean).mean(axis=(0, 1, 2))
            m = self.momentum
            self.mean[...] = ((1 - m) * self.mean[...] + m * mean).astype(self.mean[...].dtype)
            self.var[...] = ((1 - m) * self.var[...] + m * var * (n / (n - 1))).astype(self.var[...].dtype)
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        # (x - mean) * inv as PyTorch does; folding mean into the shift loses digits when |mean| >> std.
        inv = jax.lax.rsqrt(var.astype(stats_dtype) + self.epsilon) * self.scale[...]
        y = (x.astype(stats_dtype) - mean.astype(stats_dtype)) * inv + self.bias[...]
        return y.astype(self.dtype)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """``torch.nn.MaxPool2d(2, 2)`` on NHWC: odd trailing rows/columns are dropped, as in PyTorch.

    The gradient (custom) goes to the first maximum of each window in row-major order, PyTorch's
    rule for ties (e.g. windows of zeros after ReLU). Autodiff of ``reduce_window`` would track the
    argmax with four index arrays per pool and scatter, which XLA's CPU backend runs several times
    slower. Here the forward pass keeps the winner's position (0..3, int8) and the backward pass
    routes the gradient with four selects: the windows do not overlap, so no scatter is needed.
    The position is saved rather than found again by comparing x with the max: under ``jit`` XLA
    may recompute x inside the backward fusion with different rounding, and equality would fail.
    """
    return _max_and_position(x)[0]


def _max_and_position(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Max of each 2x2 window and its position in row-major order, scanning as PyTorch does:
    a later value wins if it is greater, or NaN."""
    n, h, w, c = x.shape
    win = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    best, position = win[:, :, 0, :, 0], jnp.zeros((n, h // 2, w // 2, c), jnp.int8)
    for k, (i, j) in enumerate(((0, 1), (1, 0), (1, 1)), start=1):
        v = win[:, :, i, :, j]
        take = (v > best) | jnp.isnan(v)
        best, position = jnp.where(take, v, best), jnp.where(take, jnp.int8(k), position)
    return best, position


def _max_pool_fwd(x):
    y, position = _max_and_position(x)
    return y, (position, x.shape)


def _max_pool_bwd(residuals, dy):
    position, (n, h, w, c) = residuals
    zero = jnp.zeros_like(dy)
    parts = [jnp.where(position == k, dy, zero) for k in range(4)]  # (0,0), (0,1), (1,0), (1,1)
    dx = jnp.stack(parts, axis=3).reshape(n, h // 2, w // 2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    dx = dx.reshape(n, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def pad_to_even(x: jax.Array) -> jax.Array:
    """``x`` (NHWC, after ReLU or not) with an odd height or width padded by one row/column of -inf at the
    bottom/right: a 2x2 max-pool of it is PyTorch's ``ceil_mode=True`` pool (the last window sees only its real
    values; gradients reach only them)."""
    h, w = x.shape[1:3]
    if h % 2 == 0 and w % 2 == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
