"""Linear resizing of [B, H, W, C] arrays: jax.image.resize's values for "linear", in a few taps.

jax.image.resize contracts each spatial axis with a dense [input, output] weight
matrix, almost all zeros. On XLA:CPU, resizing configs/camvid_cpu.py's logits back
to 360 x 480 (4 images, 11 classes) took 73 ms, and resizing the input to half size
12 ms, against 120-160 ms for the network itself. Linear interpolation has at most
two nonzero weights per output pixel, and a few more where an antialiased
downsampling widens the kernel (four for a factor of 2). `linear` computes the same
weight matrix as jax once per size pair, in numpy, and sums that many gathered rows,
then columns, each times its weight: 7-18 ms and 2.5-4 ms; camvid_cpu's evaluation step
1.23-1.31x faster, `fcn.load(...).predict` 1.31-1.42x (`python benchmarks/resize.py`,
2-core Xeon, 2026-11-23). The values equal jax.image.resize's up to float rounding
(tests/test_model.py): of CamVid's 17.2 million val pixels, a model trained 60 steps
predicted one differently (a near tie between two classes).

The gradient is gathers too, through the transposed weight matrix, which has as few
nonzeros per column (jax would make scatter-adds of the forward gathers, which XLA:CPU
runs on one core: 115-136 ms against jax's 64-94 ms for the top level's upsampling).
So the U-Net's bilinear upsampling (`model.upsample = "resize"`) uses it as well: that
network's forward pass ran 1.18-1.20x faster, its training step 1.07x. Being a
custom_vjp, it has no forward-mode derivative (jax.jvp); reverse mode is the one
training uses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def linear(x_BHWC: jax.Array, size_hw: tuple[int, int], *, antialias: bool = True) -> jax.Array:
    """jax.image.resize(x, (B, H, W, C), "linear", antialias=antialias) for x [B, h, w, C] of
    concrete h and w (otherwise, or for integer arrays, it is jax.image.resize itself)."""
    b, *_, c = x_BHWC.shape
    concrete = all(isinstance(n, int) for n in (*x_BHWC.shape[1:3], *size_hw))
    if not concrete or not jnp.issubdtype(x_BHWC.dtype, jnp.floating):
        return jax.image.resize(x_BHWC, (b, *size_hw, c), "linear", antialias=antialias)
    for axis, n_out in ((1, size_hw[0]), (2, size_hw[1])):
        if x_BHWC.shape[axis] != n_out:
            x_BHWC = _resize_axis(x_BHWC, axis, x_BHWC.shape[axis], n_out, antialias)
    return x_BHWC


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _resize_axis(x, axis: int, n_in: int, n_out: int, antialias: bool):
    return _gather_taps(x, axis, *_taps(n_in, n_out, antialias, False))


def _resize_axis_fwd(x, axis, n_in, n_out, antialias):
    return _resize_axis(x, axis, n_in, n_out, antialias), None


def _resize_axis_bwd(axis, n_in, n_out, antialias, _, dy):
    # The transposed weight matrix has as few nonzeros per column: the gradient is gathers
    # too, not the scatter-adds that jax would make of the forward gathers.
    return (_gather_taps(dy, axis, *_taps(n_in, n_out, antialias, True)),)


_resize_axis.defvjp(_resize_axis_fwd, _resize_axis_bwd)


def _gather_taps(x, axis: int, index_KO, weight_KO):
    """sum over k of x's entries index[k] along `axis`, each times weight[k] (per output entry)."""
    shape = [1] * x.ndim
    shape[axis] = index_KO.shape[1]
    y = None
    for index_O, weight_O in zip(index_KO, weight_KO, strict=True):
        term = jnp.take(x, index_O, axis=axis, mode="clip") * jnp.asarray(weight_O, x.dtype).reshape(shape)
        y = term if y is None else y + term
    return y


@functools.lru_cache(maxsize=128)
def _taps(n_in: int, n_out: int, antialias: bool, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(source index, weight), each [taps, destination]: the nonzero entries of each column of
    `_weights` (source = input, destination = output), or of its transpose; with a triangle
    kernel they are contiguous. Padded with weight 0."""
    w = _weights(n_in, n_out, antialias)
    w = w.T if transposed else w
    n_src = w.shape[0]
    nonzero = w != 0
    k = max(1, int(nonzero.sum(0).max()))
    first = np.where(nonzero.any(0), nonzero.argmax(0), 0)
    index = first[None, :] + np.arange(k)[:, None]
    clipped = np.minimum(index, n_src - 1)  # past the last source: weight 0
    weight = np.where(index < n_src, np.take_along_axis(w, clipped, 0), 0)
    return clipped.astype(np.int32), weight.astype(np.float32)


def _weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """[n_in, n_out] float32: jax.image.scale.compute_weight_mat for the triangle kernel, no
    translation and no edge padding, computed as jax computes it (in float32). Not jax's own:
    it is private, and getting its matrix through jax.image.resize of an identity took 1.5-1.8 s
    per size pair on a 2-core Xeon (eager dispatch); this one equals it to 3e-8."""
    f32 = np.float32
    inv_scale = f32(1.0 / (n_out / n_in))  # jax's scale is a Python float, cast when used
    kernel_scale = max(inv_scale, f32(1)) if antialias else f32(1)
    sample_O = (np.arange(n_out, dtype=f32) + f32(0.5)) * inv_scale - f32(0.5)
    x_IO = np.abs(sample_O[None, :] - np.arange(n_in, dtype=f32)[:, None]) / kernel_scale
    w_IO = np.maximum(f32(0), f32(1) - np.abs(x_IO))
    total_O = w_IO.sum(0, keepdims=True, dtype=f32)
    w_IO = np.where(np.abs(total_O) > 1000 * np.finfo(f32).eps, w_IO / np.where(total_O != 0, total_O, 1), 0)
    inside_O = (sample_O >= -0.5) & (sample_O <= n_in - 0.5)
    return np.where(inside_O[None, :], w_IO, 0).astype(f32)
