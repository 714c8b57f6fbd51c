"""Normalisation after the U-Net's convolutions: batch norm, group norm or none, by name.

Batch norm in training (`batch_norm_train`) is nnx.BatchNorm's function with
the ReLU after it fused in where it can be: by oneDNN where the convolution
before runs on oneDNN, else with a hand-written gradient (`_bn_relu`).
In inference `Norm.folded` gives the per-channel scale and shift that
`conv_bias_relu` folds into the convolution before it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from fcn import layers, onednn, ops

NORMS = ("batch", "group", "none")


def _groups(channels: int, max_groups: int = 8) -> int:
    """The largest group count <= max_groups that divides `channels`."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


class Norm(nnx.Module):
    """Batch norm, group norm, or identity, chosen by name."""

    def __init__(self, channels: int, kind: str, *, dtype, rngs: nnx.Rngs):
        self.kind = kind
        if kind == "batch":
            self.norm = nnx.BatchNorm(channels, momentum=0.9, dtype=dtype, rngs=rngs)
        elif kind == "group":
            self.norm = nnx.GroupNorm(channels, num_groups=_groups(channels), dtype=dtype, rngs=rngs)
        elif kind == "none":
            self.norm = None
        else:
            raise ValueError(f"model.norm={kind!r}: expected one of {NORMS}")

    def folded(self):
        """(scale, shift) per channel with norm(x) = x * scale + shift, for batch norm on its running
        statistics (inference), computed in float32 whatever the model's dtype; else None."""
        bn = self.norm
        if self.kind != "batch" or not bn.use_running_average or bn.axis != -1:
            return None
        scale_C = jax.lax.rsqrt(bn.var[...] + bn.epsilon)
        if bn.scale is not None:
            scale_C = scale_C * bn.scale[...]
        shift_C = -bn.mean[...] * scale_C
        if bn.bias is not None:
            shift_C = shift_C + bn.bias[...]
        return scale_C, shift_C

    def __call__(self, x, *, relu: bool = False, conv: nnx.Conv | None = None):
        """norm(x), then a ReLU when `relu` (fused with batch norm's training form; by oneDNN
        where `conv`, the convolution x came from, runs on oneDNN)."""
        if self.kind == "batch" and not self.norm.use_running_average:
            return batch_norm_train(self.norm, x, relu=relu, conv=conv)
        x = x if self.norm is None else self.norm(x)
        return jax.nn.relu(x) if relu else x


def batch_norm_train(
    bn: nnx.BatchNorm, x_BHWC: jax.Array, *, relu: bool = False, conv: nnx.Conv | None = None
) -> jax.Array:
    """nnx.BatchNorm in training mode (batch statistics, running averages updated), then ReLU if asked.

    The values are nnx.BatchNorm's, computed the same way. Two differences:
    - nnx.BatchNorm writes its running statistics with `mean[...] = new`;
      under jit that asks the traced value for its sharding, and jax answers
      with an error message built by walking the whole program traced so
      far. For the U-Net's 18 batch norms that was about half the time of
      tracing the training step, paid at every start. Here the statistics are
      replaced whole (`set_value(new)`), which asks nothing.
    - Batch norm + ReLU is one function with a hand-written gradient
      (`_bn_relu`): the training step ran 4-8% faster than with XLA:CPU's own
      differentiation of it, and 4% faster on an H200 in bfloat16 (15 -> 14.5 ms
      at 16 x 360 x 480; docs/benchmarks.md). Where `conv`, the convolution
      x came from, runs on oneDNN, so do batch norm + ReLU and their gradient
      (fcn.onednn.bn_relu), in float32 or bfloat16.
    Settings other than nnx's defaults on the last axis go to nnx.BatchNorm itself.
    """
    if not _plain_bn(bn, x_BHWC.ndim):
        y = bn(x_BHWC)
        return jax.nn.relu(y) if relu else y
    scale = bn.scale[...] if bn.scale is not None else None
    bias = bn.bias[...] if bn.bias is not None else None
    x_BHWC, _, _, scale, bias = bn.promote_dtype(
        (x_BHWC, bn.mean.get_value(), bn.var.get_value(), scale, bias), dtype=bn.dtype
    )
    out_dtype = bn.dtype or jnp.result_type(*(a for a in (x_BHWC, scale, bias) if a is not None))
    fused = relu and scale is not None and bias is not None
    if fused and conv is not None and x_BHWC.ndim == 4 and ops.runs_on_onednn(conv, x_BHWC):
        f32 = jnp.float32  # oneDNN's scale and shift; in float32 anyway inside _bn_relu
        y, mean_C, var_C = onednn.bn_relu(x_BHWC, scale.astype(f32), bias.astype(f32), float(bn.epsilon))
        y = y.astype(out_dtype)
    elif fused:
        y, mean_C, var_C = _bn_relu(x_BHWC, scale, bias, bn.epsilon, out_dtype)
    else:
        y, mean_C, var_C = _bn_forward(x_BHWC, scale, bias, bn.epsilon, out_dtype, barrier=False)
        y = jax.nn.relu(y) if relu else y
    update_running_stats(bn, mean_C, var_C)
    return y


def _plain_bn(bn: nnx.BatchNorm, ndim: int) -> bool:
    """Whether `bn` normalises over every axis but the last with nnx's defaults (batch_norm_train's own path)."""
    return bn.axis in (-1, ndim - 1) and bn.axis_name is None and bn.use_fast_variance


def fusable_bn_relu(norm: Norm) -> bool:
    """Whether `norm` is a training-mode batch norm whose ReLU `_bn_relu`'s form computes: one that
    fcn.head_loss may take into its kernel."""
    bn = norm.norm
    return (
        norm.kind == "batch"
        and not bn.use_running_average
        and _plain_bn(bn, 4)
        and bn.scale is not None
        and bn.bias is not None
    )


def update_running_stats(bn: nnx.BatchNorm, mean_C, var_C) -> None:
    """nnx.BatchNorm's running averages, updated with a batch's statistics (replaced whole: see
    batch_norm_train)."""
    m = bn.momentum
    bn.mean.set_value(jax.lax.stop_gradient(m * bn.mean.get_value() + (1 - m) * mean_C))
    bn.var.set_value(jax.lax.stop_gradient(m * bn.var.get_value() + (1 - m) * var_C))


def conv_bias_relu(conv: nnx.Conv, x_BHWC, scale_K, shift_K):
    """max(conv(x) * scale + shift, 0) with an inference-mode batch norm and the ReLU after the conv
    folded in: the scale into the kernel, the shift a bias. By oneDNN in one call where the conv runs
    on oneDNN; elsewhere by the conv's own seam, with the bias and ReLU left to XLA, which on a GPU
    gives them to cuDNN as the convolution's epilogue (inference 1.20x faster on an H200; on XLA:CPU
    1.01-1.04x; docs/benchmarks.md, the twentieth session).

    None for a conv with a mask, groups, dilation or explicit padding: the caller then runs the
    three steps itself.
    """
    if not layers.plain_conv(conv):
        return None
    w = conv.kernel[...] * scale_K
    b = shift_K if conv.bias is None else conv.bias[...] * scale_K + shift_K
    x_BHWC, w = conv.promote_dtype((x_BHWC, w), dtype=conv.dtype)
    geometry = ops.onednn_geometry(conv, x_BHWC, w)
    if geometry is not None:
        return onednn.conv_bias_relu(x_BHWC, w, b.astype(jnp.float32), *geometry)
    y = layers.plain_conv_call(conv, x_BHWC, w)
    return jax.nn.relu(y + b.astype(y.dtype))


def batch_stats(x_BHWC):
    """Per-channel batch mean and variance over every axis but the last, as nnx.BatchNorm computes
    them (use_fast_variance), in at least float32."""
    x32 = x_BHWC.astype(jnp.promote_types(x_BHWC.dtype, jnp.float32))
    axes = tuple(range(x_BHWC.ndim - 1))
    mean_C, mean2_C = x32.mean(axes), jax.lax.square(x32).mean(axes)
    return mean_C, jnp.maximum(0.0, mean2_C - jax.lax.square(mean_C))


def _bn_forward(x_BHWC, scale, bias, epsilon, out_dtype, *, barrier: bool):
    """(normalised x, batch mean, batch variance), as nnx.BatchNorm computes them (use_fast_variance)."""
    mean_C, var_C = batch_stats(x_BHWC)
    mul_C = jax.lax.rsqrt(var_C + epsilon)
    if scale is not None:
        mul_C = mul_C * scale
    shift_C = mean_C
    if barrier:  # per-channel numbers computed once, not inside the loop over every pixel
        shift_C, mul_C = _per_channel((shift_C, mul_C))
    y = (x_BHWC - shift_C) * mul_C
    if bias is not None:
        y = y + bias
    return y.astype(out_dtype), mean_C, var_C


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_relu(x_BHWC, scale_C, bias_C, epsilon, out_dtype):
    """relu(batch norm(x)) -> (y, batch mean, batch variance); the gradient flows through y only."""
    y, mean_C, var_C = _bn_forward(x_BHWC, scale_C, bias_C, epsilon, out_dtype, barrier=True)
    return jax.nn.relu(y), mean_C, var_C


def _bn_relu_fwd(x_BHWC, scale_C, bias_C, epsilon, out_dtype):
    y, mean_C, var_C = _bn_relu(x_BHWC, scale_C, bias_C, epsilon, out_dtype)
    return (y, mean_C, var_C), (x_BHWC, mean_C, var_C, scale_C, bias_C)


def _bn_relu_bwd(epsilon, out_dtype, res, cotangents):
    # With d = dy where y > 0 and xhat = (x - mean) / std, over the N pixels of each channel:
    # dbias = sum d, dscale = sum d * xhat, dx = scale / std * (d - mean(d) - xhat * mean(d * xhat)).
    # dscale is taken as (sum d * x - mean * sum d) / std: XLA then reads x in the sum and does
    # not write xhat out whole first (the gradient of batch norm + ReLU at 8 x 176 x 240 x 16
    # ran 17.0 -> 12.5 ms on a 2-core Xeon; docs/benchmarks.md, the thirteenth session).
    # The ReLU's mask is recomputed from x, as the forward computed y, rather than read from y: each
    # of the two passes over the activations below then reads two of them (dy, x), not three.
    x_BHWC, mean_C, var_C, scale_C, bias_C = res
    dy = cotangents[0]
    axes = tuple(range(x_BHWC.ndim - 1))
    inv_C = jax.lax.rsqrt(var_C + epsilon)
    mul_C = inv_C * scale_C  # as _bn_forward's
    mean_C, inv_C, mul_C = _per_channel((mean_C, inv_C, mul_C))
    x32 = x_BHWC.astype(inv_C.dtype)
    d = jnp.where((x32 - mean_C) * mul_C + bias_C > 0, dy, 0).astype(inv_C.dtype)
    dx, dscale_C, dbias_C = bn_grad_from_sums(x_BHWC, d, mean_C, inv_C, scale_C, d.sum(axes), (d * x32).sum(axes))
    return dx, dscale_C.astype(scale_C.dtype), dbias_C.astype(bias_C.dtype)


def bn_grad_from_sums(x, d, mean_C, inv_C, scale_C, dbias_C, dx_sum_C):
    """Batch norm's gradients (dx, dscale, dbias) from d, the gradient at its output (after the ReLU's
    mask), and the two sums over pixels that `_bn_relu_bwd` takes: sum d and sum d * x."""
    n = x.size // x.shape[-1]
    dscale_C = inv_C * (dx_sum_C - mean_C * dbias_C)
    k_C, dmean_C, c_C = _per_channel((scale_C * inv_C, dbias_C / n, dscale_C * inv_C / n))
    dx = k_C * (d - dmean_C - (x - mean_C) * c_C)
    return dx.astype(x.dtype), dscale_C, dbias_C


_bn_relu.defvjp(_bn_relu_fwd, _bn_relu_bwd)


def _per_channel(values):
    """Per-channel vectors computed once, before a loop over every pixel uses them: XLA:CPU would
    otherwise recompute them inside the loop. Left to XLA elsewhere: on a GPU the barrier adds
    small kernels of its own."""
    return jax.lax.optimization_barrier(values) if jax.default_backend() == "cpu" else values
