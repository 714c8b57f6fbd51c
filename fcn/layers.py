"""The U-Net's nnx layers' own pieces: the bias added with a float32 gradient where that matters.

`add_bias(y, bias)` is y + bias as flax adds a layer's bias, except that on a CPU a float32 bias
in a bfloat16 network gets its gradient summed in float32. `Conv` is nnx.Conv with its bias
added that way (fcn.ops.ConvTranspose adds its own so too). `plain_conv` and `plain_conv_call`
say when an nnx.Conv is one call of its seam plus a bias, and make that call (fcn.norm folds
batch norm into such convs).
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
