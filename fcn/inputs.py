"""Images read as fcn's predictors read them (fcn.inference's module docstring, Inputs): file paths, PIL
images or arrays, checked and named when they are not images; batches; the predictor's shrinking and
resizing. Without flax, so that fcn.exported runs an exported model with jax, numpy and PIL alone."""

from __future__ import annotations

import reprlib
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from fcn.data.images import DataError, fit_image, fitted_size, pil_rgb, read_image


def read_input(image, name: str = "image") -> np.ndarray:
    """One image (path, PIL image or array) as uint8 or float32 [H, W, 3]; see module doc."""
    if isinstance(image, str | Path):
        if Path(image).is_dir():
            raise DataError(f"{image}: is a directory, not an image file")
        return read_image(image)
    if isinstance(image, Image.Image):
        return pil_rgb(image, name)
    try:
        array = np.asarray(image)
    except Exception as e:  # noqa: BLE001 - anything numpy cannot read is not an image
        raise DataError(f"{name}: cannot be read as an array ({type(image).__name__}: {e})") from None
    if array.dtype == object or (array.ndim == 0 and not isinstance(image, np.ndarray | np.generic | jax.Array)):
        # None, a dict, a generator, a ragged list: "shape ()" would not say what was wrong
        raise DataError(
            f"{name}: {reprlib.repr(image)} ({type(image).__name__}) is not an image; expected a file path, "
            "a PIL image, or an array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]"
        )
    return _check_array(array, name)


def _check_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise DataError(f"{name}: shape {array.shape}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
    if 0 in array.shape:
        raise DataError(f"{name}: empty image ({array.shape[0]}x{array.shape[1]} pixels)")
    kind = array.dtype.kind
    if kind in "iu" and array.dtype != np.uint8:
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"{name}: {array.dtype} values in {lo}..{hi}; integer images must be 8-bit (0..255): "
                "convert 16-bit images to 8 bits, or pass floats in [0, 1]"
            )
        array = array.astype(np.uint8)
    elif kind == "f" or jax.dtypes.issubdtype(array.dtype, np.floating):  # bfloat16 too, numpy's kind "V"
        array = array.astype(np.float32)
        lo, hi = float(array.min()), float(array.max())
        if not (np.isfinite(lo) and np.isfinite(hi) and 0.0 <= lo and hi <= 1.0):
            raise DataError(
                f"{name}: float values in [{lo:g}, {hi:g}]; float images must be in [0, 1] (divide 0..255 by 255)"
            )
    elif array.dtype != np.uint8:
        raise DataError(f"{name}: dtype {array.dtype}; expected uint8, integers in 0..255, or floats in [0, 1]")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def _as_batch(images) -> tuple[list, str]:
    """(images as a list, how to return results: 'single', 'list' or 'stack')."""
    if isinstance(images, list | tuple):
        return list(images), "list"
    if isinstance(images, np.ndarray | jax.Array) and images.ndim == 4:
        return list(np.asarray(images)), "stack"
    return [images], "single"


def to01(image_HWC: np.ndarray) -> np.ndarray:
    if image_HWC.dtype == np.uint8:
        return image_HWC.astype(np.float32) / 255.0
    return image_HWC


def read_batch(images) -> tuple[list[np.ndarray], str]:
    """Images (see module doc) read as arrays, and how to return results: 'single', 'list' or 'stack'."""
    batch, kind = _as_batch(images)
    return [read_input(x, "image" if kind == "single" else f"image {i}") for i, x in enumerate(batch)], kind


def float_batch(images, max_size: int = 0) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """Images read as the predictor reads them, as float32 [B, H, W, 3] in [0, 1], whether a single
    image was given, and their own (H, W) (fcn.exported's ExportedModel). A batch's images must share one
    size. max_size: shrink them first when their longer side exceeds it, as the predictor does."""
    arrays, kind = read_batch(images)
    if not arrays:
        raise DataError("empty batch of images: nothing to predict")
    if len({a.shape for a in arrays}) > 1:
        sizes = sorted({f"{a.shape[0]}x{a.shape[1]}" for a in arrays})
        raise DataError(f"a batch of images of sizes {', '.join(sizes)}: one call takes images of one size")
    size = arrays[0].shape[:2]
    if max_size and max(size) > max_size:
        arrays = [shrink(a, max_size) for a in arrays]
    return np.stack([to01(a) for a in arrays]), kind == "single", size


def resize_channels(x_HWC: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of float32 channels, one PIL 'F' image each."""
    bilinear = Image.Resampling.BILINEAR
    chans = [Image.fromarray(x_HWC[..., c]).resize((w, h), bilinear) for c in range(x_HWC.shape[-1])]
    return np.stack([np.asarray(c) for c in chans], axis=-1)


def shrink(image_HWC: np.ndarray, max_size: int) -> np.ndarray:
    """Shrink so the longer side is max_size (to the size `data.max_size` gave in training): a uint8
    image exactly as `data.max_size` shrank the training and evaluation images (fit_image), so that
    evaluation scores what `predict` returns; a float one in float."""
    if image_HWC.dtype == np.uint8:
        return fit_image(image_HWC, max_size)
    return resize_channels(image_HWC, *fitted_size(*image_HWC.shape[:2], max_size))


def softmax_inplace(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place on a float32 array."""
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits
