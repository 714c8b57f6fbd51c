"""The U-Net's nnx layers' own pieces: the bias added with a float32 gradient where that matters.

`add_bias(y, bias)` is y + bias as flax adds a layer's bias, except that on a CPU a float32 bias
in a bfloat16 network gets its gradient summed in float32. `Conv` is nnx.Conv with its bias
added that way (fcn.ops.ConvTranspose adds its own so too). `plain_conv` and `plain_conv_call`
say when an nnx.Conv is one call of its seam plus a bias, and make that call (fcn.norm folds
batch norm into such convs). `max_pool_2x2` is the U-Net's pooling, with a gradient of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


def pair(v) -> tuple[int, int]:
    """An nnx.Conv's strides or dilation (an int, a pair, or None for 1) as a pair."""
    return (v, v) if isinstance(v, int) else tuple(v or (1, 1))


def plain_conv(conv: nnx.Conv) -> bool:
    """Whether nnx.Conv computes conv_general_dilated(x, kernel, strides, padding) on NHWC, plus bias."""
    return (
        conv.mask is None
        and conv.feature_group_count == 1
        and conv.precision is None
        and pair(conv.input_dilation) == pair(conv.kernel_dilation) == (1, 1)
        and isinstance(conv.padding, str)
        and conv.padding in ("SAME", "VALID")
        and len(conv.kernel_size) == 2
    )


def plain_conv_call(conv: nnx.Conv, x_BHWC, kernel):
    """The convolution of a `plain_conv` (x and kernel already in its dtype), through its seam, no bias."""
    kwargs = {} if conv.preferred_element_type is None else {"preferred_element_type": conv.preferred_element_type}
    seam = conv.conv_general_dilated or lax.conv_general_dilated
    return seam(x_BHWC, kernel, pair(conv.strides), conv.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kwargs)


class Conv(nnx.Conv):
    """nnx.Conv, with the bias added by `add_bias` where that changes its gradient (a bias of another
    dtype than the computation, on a CPU); otherwise nnx.Conv itself. Same parameters."""

    def __call__(self, inputs, out_sharding=None):
        dtype = self.dtype or inputs.dtype
        if (
            out_sharding is not None
            or self.bias is None
            or inputs.ndim != 4
            or not _sum_bias_in_f32(dtype, self.bias.dtype)
            or not plain_conv(self)
        ):
            return super().__call__(inputs, out_sharding=out_sharding)
        inputs, kernel = self.promote_dtype((inputs, self.kernel[...]), dtype=self.dtype)
        return add_bias(plain_conv_call(self, inputs, kernel), self.bias[...])


def add_bias(y, bias_C):
    """y + bias over the last axis, in y's dtype (bias cast to it), as flax adds a layer's bias.

    On a CPU, when the two dtypes differ (a float32 bias in a bfloat16 network), the bias's
    gradient, a sum over every pixel, is summed in float32 (`_add_bias`). jax's own gradient
    sums in bfloat16, which XLA:CPU runs as a slow windowed reduction: 9.5 ms against 1.5 ms
    for 8 x 176 x 240 x 16 on a 2-core Xeon; 38 of the 244 ms of camvid_cpu's bfloat16 training
    step went to its biases (docs/benchmarks.md, the twenty-seventh session). Elsewhere the plain
    sum, whose program is unchanged.
    """
    if not _sum_bias_in_f32(y.dtype, bias_C.dtype):
        return y + bias_C.astype(y.dtype)
    return _add_bias(y, bias_C)


def _sum_bias_in_f32(y_dtype, bias_dtype) -> bool:
    return jnp.dtype(y_dtype) != jnp.dtype(bias_dtype) and jax.default_backend() == "cpu"


@jax.custom_vjp
def _add_bias(y, bias_C):
    return y + bias_C.astype(y.dtype)


def _add_bias_fwd(y, bias_C):
    return _add_bias(y, bias_C), bias_C


def _add_bias_bwd(bias_C, dy):
    axes = tuple(range(dy.ndim - 1))
    return dy, jnp.sum(dy, axes, dtype=jnp.promote_types(bias_C.dtype, jnp.float32)).astype(bias_C.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_jvp
def max_pool_2x2(x_BHWC: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, on even H and W: the maximum of four strided slices.

    The same values as nnx.max_pool, and the same derivative (`_max_pool_2x2_jvp`): each window's
    gradient goes to its first maximum in row-major order, as XLA's and PyTorch's pooling gradients
    do. Not nnx.max_pool itself: its gradient is the windowed reduction's scatter (a camvid_cpu
    training step took 1.7 s against 1.2 s, timed once on a loaded 2-core machine). Slices, not a
    reshape and a max over the window: the reshape form's jax-derived gradient gave NaN under XLA's
    unoptimised CPU compilation. An odd H or W is refused (the slices would broadcast into a wrong
    answer); the U-Net pads its input to a multiple of 2**depth first.
    """
    if x_BHWC.ndim != 4 or x_BHWC.shape[1] % 2 or x_BHWC.shape[2] % 2:
        raise ValueError(f"max_pool_2x2 needs [B, H, W, C] with even H and W, got shape {tuple(x_BHWC.shape)}")
    top = jnp.maximum(x_BHWC[:, 0::2, 0::2], x_BHWC[:, 0::2, 1::2])
    bottom = jnp.maximum(x_BHWC[:, 1::2, 0::2], x_BHWC[:, 1::2, 1::2])
    return jnp.maximum(top, bottom)


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
    """The tangent of the first maximum of each window, written with x seen as [B, H/2, 2, W/2, 2, C]
    (a reshape, no copy): the gradient, its transpose, is one elementwise pass that writes each
    window's four values at once. jax's own derivative of the four slices' maximum split the
    gradient among tied maxima (ReLU zeros tie often; the ReLU's gradient is 0 there either way).
    Alone the two take about the same time; inside camvid_cpu's training step on a 2-core Xeon
    the four pooling gradients took 11.0-15.4 ms before, 9.8-11.7 ms after (four alternating
    profiles, benchmarks/profile_step.py; docs/benchmarks.md, the fifteenth session).
    """
    (x_BHWC,), (dx_BHWC,) = primals, tangents
    y_BHWC = max_pool_2x2(x_BHWC)
    b, h, w, c = x_BHWC.shape
    x6 = x_BHWC.reshape(b, h // 2, 2, w // 2, 2, c)
    is_max = x6 == y_BHWC[:, :, None, :, None, :]
    # The first maximum in window order (0, 0), (0, 1), (1, 0), (1, 1): a maximum with none before it.
    m00, m01, m10, m11 = (is_max[:, :, i, :, j] for i in (0, 1) for j in (0, 1))
    f01 = m01 & ~m00
    f10 = m10 & ~(m00 | m01)
    f11 = m11 & ~(m00 | m01 | m10)
    first6 = jnp.stack([jnp.stack([m00, f01], axis=3), jnp.stack([f10, f11], axis=3)], axis=2)
    return y_BHWC, jnp.sum(jnp.where(first6, dx_BHWC.reshape(x6.shape), 0.0), axis=(2, 4))
