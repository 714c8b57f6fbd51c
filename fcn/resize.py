"""Linear resizing of [B, H, W, C] arrays: jax.image.resize's values for "linear", in a few taps.

jax.image.resize contracts each spatial axis with a dense [input, output] weight
matrix, almost all zeros. On XLA:CPU, resizing configs/camvid_cpu.py's logits back
to 360 x 480 (4 images, 11 classes) took 73 ms, and resizing the input to half size
12 ms, against 120-160 ms for the network itself. Linear interpolation has at most
two nonzero weights per output pixel, and a few more where an antialiased
downsampling widens the kernel (four for a factor of 2). `linear` computes the same
weight matrix as jax once per size pair, in numpy, and sums that many gathered rows,
then columns, each times its weight: 7-9 ms and 2.5-3 ms; the evaluation step
1.24-1.31x faster, `fcn.load(...).predict` 1.31x (`python benchmarks/resize.py`,
2-core Xeon, 2026-11-23). The values equal jax.image.resize's up to float rounding
(tests/test_model.py): of CamVid's 17.2 million val pixels, a model trained 60 steps
predicted one differently (a near tie between two classes).

For inference and evaluation: under a gradient the gathers become scatter-adds, which
XLA:CPU runs on one core; training's batches come resized already (`prescaled`).
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
            x_BHWC = _resize_axis(x_BHWC, axis, n_out, antialias)
    return x_BHWC


def _resize_axis(x, axis: int, n_out: int, antialias: bool):
    index_KO, weight_KO = _taps(x.shape[axis], n_out, antialias)
    shape = [1] * x.ndim
    shape[axis] = n_out
    y = None
    for index_O, weight_O in zip(index_KO, weight_KO, strict=True):
        term = jnp.take(x, index_O, axis=axis, mode="clip") * jnp.asarray(weight_O, x.dtype).reshape(shape)
        y = term if y is None else y + term
    return y


@functools.lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """(input index, weight), each [taps, n_out]: the nonzero entries of `_weights`' columns,
    which are contiguous (a triangle kernel), padded with weight 0."""
    w_IO = _weights(n_in, n_out, antialias)
    nonzero = w_IO != 0
    k = max(1, int(nonzero.sum(0).max()))
    first_O = np.where(nonzero.any(0), nonzero.argmax(0), 0)
    index_KO = first_O[None, :] + np.arange(k)[:, None]
    weight_KO = np.where(index_KO < n_in, np.take_along_axis(w_IO, np.minimum(index_KO, n_in - 1), 0), 0)
    return np.minimum(index_KO, n_in - 1).astype(np.int32), weight_KO.astype(np.float32)


def _weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """[n_in, n_out] float32: jax.image.scale.compute_weight_mat for the triangle kernel, no
    translation and no edge padding, computed as jax computes it (in float32)."""
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
