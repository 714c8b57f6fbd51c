"""Where a predictor puts an image: on a bucketed canvas whose padding every convolution masks,
or in overlapping tiles blended by linear ramps (fcn.inference.Segmenter; its module docstring
says why). The tiling (`tiles`, `tiled`) is shared with fcn.exported.ExportedModel, so this module
imports no flax at the top (only `maskable` does, when called).

`masked(conv)` wraps a model's convolution primitive: inside `valid_region(valid_B2, canvas_hw)`
(a trace of the model) it zeroes the input outside each example's valid (H, W) before the
convolution, exactly the 'SAME' zero padding a canvas of the valid size would give. `maskable`
says whether that makes a model's result on a larger canvas equal to the exact one.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

_REGION = threading.local()


@contextlib.contextmanager
def valid_region(valid_B2: jax.Array, canvas_hw: tuple[int, int]):
    """While tracing the model, masked convolutions read the valid (H, W) of each row."""
    _REGION.value = (valid_B2, canvas_hw)
    try:
        yield
    finally:
        _REGION.value = None


def masked(conv: Callable) -> Callable:
    """Wrap a conv primitive: zero its input outside the valid region first.

    Zeros there are exactly the 'SAME' zero padding the convolution would see
    on a canvas of the valid size. Every level of the U-Net is a power-of-two
    fraction of the canvas, and valid sizes are multiples of 2**depth.
    """

    def masked_conv(lhs_BHWC, rhs, *args, **kwargs):
        region = getattr(_REGION, "value", None)
        if region is not None:
            valid_B2, (ch, cw) = region
            h, w = lhs_BHWC.shape[1:3]
            rows = jnp.arange(h)[None, :] < (valid_B2[:, 0] // (ch // h))[:, None]
            cols = jnp.arange(w)[None, :] < (valid_B2[:, 1] // (cw // w))[:, None]
            inside_BHW1 = (rows[:, :, None] & cols[:, None, :])[..., None]
            lhs_BHWC = jnp.where(inside_BHW1, lhs_BHWC, jnp.zeros((), lhs_BHWC.dtype))
        return conv(lhs_BHWC, rhs, *args, **kwargs)

    return masked_conv


def maskable(model) -> bool:
    """Whether zeroing conv inputs makes a large canvas equal to the exact one (model: an nnx.Module)."""
    from flax import nnx

    modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
    per_pixel = not any(isinstance(m, nnx.GroupNorm | nnx.LayerNorm) for m in modules)
    resizes = getattr(model, "upsample_kind", "resize") != "transpose" or getattr(model, "input_scale", 1) != 1
    return per_pixel and not resizes


def ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def size(h: int, w: int, align: int, bucket: int, tile: int) -> tuple[int, int]:
    """The canvas (H, W) of an image or of its tiles: each side rounded up to `align`, then to
    `bucket`, and at most `tile`."""
    return tuple(min(ceil_to(ceil_to(min(n, tile), align), bucket), tile) for n in (h, w))


def tiles(tile: int, overlap: int, multiple: int) -> tuple[int, int]:
    """(tile, overlap) as a tiling uses them: the tile side rounded down to a multiple of `multiple`
    (at least one), the overlap rounded up to one and less than the tile."""
    tile = max(multiple, tile // multiple * multiple)
    return tile, min(ceil_to(max(overlap, 0), multiple), tile - multiple)


def tiled(
    image_HWC: np.ndarray,
    run: Callable[[Iterable[np.ndarray]], Iterable[np.ndarray]],
    tile: int,
    overlap: int,
    multiple: int,
    num_classes: int,
) -> np.ndarray:
    """float32 logits [H, W, K] of a large image: `run` gives the logits of each of its overlapping
    tiles (crops at `tile_boxes`, those at the far edges shorter), which `blend` joins. tile and
    overlap: as `tiles` returns them."""
    h, w = image_HWC.shape[:2]
    boxes = tile_boxes(h, w, tile, overlap, multiple)
    crops = (image_HWC[y : y + tile, x : x + tile] for y, x in boxes)
    return blend(boxes, run(crops), (h, w, num_classes), overlap)


def tile_boxes(h: int, w: int, tile: int, overlap: int, multiple: int) -> list[tuple[int, int]]:
    """Origins (y, x) of the tiles that cover an h x w image: rows of tiles, each row left to right."""
    stride = tile - overlap
    return list(itertools.product(*(tile_starts(n, tile, stride, multiple) for n in (h, w))))


def tile_starts(n: int, tile: int, stride: int, multiple: int) -> list[int]:
    """Tile origins along one axis: multiples of `multiple`, the last one ending past n by < multiple."""
    if n <= tile:
        return [0]
    last = ceil_to(n - tile, multiple)
    return list(range(0, last, stride)) + [last]


def ramp(n: int, overlap: int, rise: bool, fall: bool) -> np.ndarray:
    """Blending weight along one tile axis: linear over the overlap, 1 at image borders."""
    w = np.ones(n, np.float32)
    ramp = (np.arange(n, dtype=np.float32) + 1) / (overlap + 1)
    if rise:
        w = np.minimum(w, ramp)
    if fall:
        w = np.minimum(w, ramp[::-1])
    return w


def blend(boxes: list[tuple[int, int]], logits: Iterable[np.ndarray], shape_HWK: tuple[int, int, int], overlap: int):
    """The image's float32 logits [H, W, K] from each box's tile logits, weighted by `ramp`s."""
    h, w, _ = shape_HWK
    acc_HWK = np.zeros(shape_HWK, np.float32)
    weight_HW = np.zeros((h, w), np.float32)
    for (y, x), tile_HWK in zip(boxes, logits, strict=True):
        th, tw = tile_HWK.shape[:2]
        wgt = np.outer(ramp(th, overlap, y > 0, y + th < h), ramp(tw, overlap, x > 0, x + tw < w))
        acc_HWK[y : y + th, x : x + tw] += wgt[..., None] * tile_HWK
        weight_HW[y : y + th, x : x + tw] += wgt
    acc_HWK /= weight_HW[..., None]
    return acc_HWK
