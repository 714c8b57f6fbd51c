"""From decoded examples to device batches: in memory or streamed, data order, augmentation.

Training data is decoded once and held in memory as one uint8 canvas (CamVid
train: 367 x 360 x 480 x 4 bytes, about 250 MB) when its estimated size is
within `data.max_memory_gb` (or `data.storage = "memory"`); each step the
host then only gathers B rows by index. When it does not fit (or
`data.storage = "stream"`) the examples are read from their files each step
by a few threads, some batches ahead (`fcn/data/stream.py`), and padded into
a canvas of the same shape as the in-memory one. Either way augmentation
(random scale, crop, flip, photometric jitter) runs on the accelerator inside
the jitted training step, on the same arrays.

The data order is a pure function of (seed, step): epoch e visits the examples
in `permutation(seed, e)`, and step s takes items [s*B, (s+1)*B) of that
endless stream. A resumed run therefore sees exactly the batches an unbroken
run would have seen, in memory or streamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fcn.data.base import Source, Split, decode_all
from fcn.data.images import fit_image, rescale_pair, scaled_size

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Canvas:
    """A split stacked into fixed-shape arrays; smaller examples padded at bottom/right.

    images_NHWC uint8 (padding 0), labels_NHW uint8 (padding = ignore label),
    sizes_N2 int32 true (H, W) of each example. source_labels: the labels
    before `input_scale` when it resized them (for class statistics), else None.
    """

    images_NHWC: np.ndarray
    labels_NHW: np.ndarray
    sizes_N2: np.ndarray
    source_labels: Sequence[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.images_NHWC)

    def batch(self, step: int, batch_size: int, seed: int, rows: slice = slice(None)):
        """This process's `rows` of global batch `step`: (images_BHWC, labels_BHW, sizes_B2)."""
        idx = batch_indices(step, len(self), batch_size, seed)[rows]
        return self.images_NHWC[idx], self.labels_NHW[idx], self.sizes_N2[idx]

    def labels(self) -> Iterable[np.ndarray]:
        """Every example's label before `input_scale`, in order (class frequencies)."""
        if self.source_labels is not None:
            return iter(self.source_labels)
        return (self.labels_NHW[n, :h, :w] for n, (h, w) in enumerate(self.sizes_N2))

    def close(self) -> None:
        """Nothing to release (a `stream.Stream` has threads to stop)."""


def fill(pairs: Sequence[tuple[np.ndarray, np.ndarray]], shape_hw, ignore_label: int) -> Canvas:
    """(image, label) pairs into one canvas of shape_hw, each at the top left, padded."""
    h, w = shape_hw
    images = np.zeros((len(pairs), h, w, 3), np.uint8)
    labels = np.full((len(pairs), h, w), ignore_label, np.uint8)
    sizes = np.zeros((len(pairs), 2), np.int32)
    for n, (image, label) in enumerate(pairs):
        sizes[n] = label.shape
        images[n, : label.shape[0], : label.shape[1]] = image
        labels[n, : label.shape[0], : label.shape[1]] = label
    return Canvas(images, labels, sizes)


def stack(split: Split, ignore_label: int, scale: float = 1.0, workers: int = 8) -> Canvas:
    """Stack a split into one canvas (padding varied sizes up to the largest).

    scale: resize every example by this factor first (the model's
    `input_scale`, so training sees what the network sees at evaluation), in
    `workers` threads (PIL resizes without the GIL). A split with a cache key
    (`Split.key`) has its canvas kept in fcn's cache folder too, and read back
    memory-mapped by later runs: a warm start then neither resizes nor copies
    the split (fcn/data/cache.py).
    """
    from fcn.data import cache

    key = None
    if split.key is not None:
        stamp = f"{split.key}\0canvas scale={float(scale)!r} ignore={int(ignore_label)}\0".encode()
        key = hashlib.sha256(stamp + Path(__file__).read_bytes()).hexdigest()[:32]
    canvas = None if key is None else cache.load_arrays(key, f"canvas of {len(split)} examples", 3, _canvas_of(split))
    if canvas is None:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # at scale 1, rescale_pair returns its input
            pairs = list(pool.map(lambda p: rescale_pair(*p, scale), zip(split.images, split.labels)))
        shape = np.max([lab.shape for _, lab in pairs], axis=0) if pairs else (1, 1)
        canvas = fill(pairs, shape, ignore_label)
        if key is not None:
            cache.save_arrays(key, [canvas.images_NHWC, canvas.labels_NHW, canvas.sizes_N2], "training canvas")
    return dataclasses.replace(canvas, source_labels=list(split.labels) if scale != 1 else None)


def _canvas_of(split: Split):
    """Canvas from its three cached arrays, checked against the split it was made from."""

    def build(arrays) -> Canvas:
        images, labels, sizes = arrays
        n = len(split)
        if images.shape[:1] != (n,) or images.shape[3:] != (3,) or labels.shape != images.shape[:3]:
            raise ValueError(f"canvas {images.shape} / {labels.shape} for {n} examples")
        if sizes.shape != (n, 2) or sizes.dtype != np.int32 or images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise ValueError("canvas arrays of the wrong shape or type")
        return Canvas(images, labels, sizes)

    return build


def memory_bytes(source_sizes_N2, sizes_N2) -> tuple[int, int]:
    """(peak, kept) bytes of holding a split in memory: the decoded examples at their own
    sizes, plus the canvas (uint8 RGB + label, N x largest H x largest W at the network's
    scale) that stays; loading holds both for a moment."""
    if not len(sizes_N2):
        return 0, 0
    h, w = np.max(sizes_N2, axis=0)
    kept = int(len(sizes_N2)) * int(h) * int(w) * 4
    return kept + int(sum(int(a) * int(b) * 4 for a, b in source_sizes_N2)), kept


def training_data(source: Source, config):
    """The training split in memory (a Canvas) or streamed from its files (a `stream.Stream`).

    config.data.storage: "memory", "stream", or "auto": in memory when loading
    it (`memory_bytes`, from image headers) fits in data.max_memory_gb, streamed
    otherwise. Both give the same batches for the same (seed, step).
    """
    d, scale = config.data, config.model.input_scale
    if d.storage == "memory":
        return stack(source.load(d.train_split), source.ignore_label, scale, int(d.decode_workers))
    from fcn.data import stream  # imports this module

    examples = source.examples(d.train_split)
    desc = f"{source.name} {d.train_split}"
    ids, source_sizes = stream.scan_sizes(examples, int(d.decode_workers), bool(d.skip_bad), desc)
    sizes = np.array([scaled_size(h, w, scale) for h, w in source_sizes], np.int32).reshape(-1, 2)
    peak, kept = memory_bytes(source_sizes, sizes)
    fits = d.storage == "auto" and peak <= float(d.max_memory_gb) * 2**30
    how = "held in memory" if fits else f"streamed ({d.decode_workers} threads, {d.prefetch} batches ahead)"
    logger.info(
        "%s: %d examples; in memory they would take %.1f MiB (%.1f MiB while loading), data.storage=%s, "
        "data.max_memory_gb=%g: %s",
        desc,
        len(ids),
        kept / 2**20,
        peak / 2**20,
        d.storage,
        d.max_memory_gb,
        how,
    )
    if fits:
        if len(ids) < len(examples):  # what the scan skipped (skip_bad) is not read, nor warned of, again;
            examples = examples.subset(ids)  # not kept decoded: a split with bad files skipped never is
        split = decode_all(examples, workers=int(d.decode_workers), skip_bad=bool(d.skip_bad), desc=desc)
        return stack(split, source.ignore_label, scale, int(d.decode_workers))
    return stream.Stream(
        examples,
        ids,
        sizes,
        ignore_label=source.ignore_label,
        scale=scale,
        workers=int(d.decode_workers),
        prefetch=int(d.prefetch),
        skip_bad=bool(d.skip_bad),
        desc=desc,
    )


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
    """Example indices of global batch `step` (deterministic, resumable, epoch-wise shuffled)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_examples)
        perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
        out.extend(perm[offset : offset + batch_size - len(out)])
    return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------
# Augmentation on device (jitted with the training step).


def _sample_bilinear(image_HWC: jax.Array, y_hw: jax.Array, x_hw: jax.Array) -> jax.Array:
    """Bilinear samples of image at fractional (y, x); coordinates clamped to the image.

    Each sample reads its 2 x 2 neighbourhood with one gather: the patch at (floor(y), floor(x)),
    moved back inside the image at its last row and column, with the weights measured from the
    patch's corner (so a sample past the last row weighs that row alone). One gather of uint8
    patches in place of one per corner, each of which XLA:CPU wrote out whole in float32.
    """
    h, w, c = image_HWC.shape
    ph, pw = min(2, h), min(2, w)  # a canvas one pixel high or wide has one row or column to read
    y0 = jnp.clip(jnp.floor(y_hw), 0, h - ph)
    x0 = jnp.clip(jnp.floor(x_hw), 0, w - pw)
    wy = jnp.clip(y_hw - y0, 0, 1)[..., None]
    wx = jnp.clip(x_hw - x0, 0, 1)[..., None]
    starts = (y0.astype(jnp.int32).reshape(-1), x0.astype(jnp.int32).reshape(-1))
    patch = jax.vmap(lambda y, x: jax.lax.dynamic_slice(image_HWC, (y, x, 0), (ph, pw, c)))(*starts)
    patch = patch.reshape(*y_hw.shape, ph, pw, c)
    p00, p01, p10, p11 = (patch[..., i, j, :].astype(jnp.float32) for i in (0, ph - 1) for j in (0, pw - 1))
    top = p00 * (1 - wx) + p01 * wx
    bottom = p10 * (1 - wx) + p11 * wx
    return top * (1 - wy) + bottom * wy


def _placement(span: jax.Array, u: jax.Array) -> jax.Array:
    """The whole number in [min(0, span), max(0, span)] that the uniform [0, 1) `u` picks."""
    first, last = jnp.minimum(span, 0), jnp.maximum(span, 0)
    return jnp.minimum(first + jnp.floor(u * (last - first + 1)), last)


# The uniform numbers each example's augmentation draws, in this order (`_augment_one`).
_DRAWS = ("scale", "offset_y", "offset_x", "flip", "brightness", "contrast", "saturation")


def _augment_one(u_7, image_HWC, label_HW, size_2, *, crop, scale_range, hflip, jitter, ignore_label):
    """One example's augmentation, given its uniform [0, 1) numbers `u_7` (named in `_DRAWS`)."""
    u = dict(zip(_DRAWS, u_7))
    ch, cw = crop
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    s = jnp.exp(lo + (hi - lo) * u["scale"])
    h, w = size_2[0].astype(jnp.float32), size_2[1].astype(jnp.float32)
    # Place the crop window over the rescaled image's pixels, or the image in the window when it has
    # fewer: a whole-pixel offset, uniform over every placement. The rescaled image has as many pixels
    # as pixel centres inside h * s (ceil(h * s - 0.5), the `inside` test below), so the last one, a
    # pixel the sampler clamps to the last row, is in the window at the last placement. (floor(u *
    # (h * s - crop)) never drew that placement: at scale 1 no crop showed an image's last row.)
    span_y = jnp.ceil(h * s - 0.5) - ch
    span_x = jnp.ceil(w * s - 0.5) - cw
    oy, ox = _placement(span_y, u["offset_y"]), _placement(span_x, u["offset_x"])
    ii = jnp.arange(ch, dtype=jnp.float32)[:, None]
    jj = jnp.arange(cw, dtype=jnp.float32)[None, :]
    flip = hflip & (u["flip"] < 0.5)
    jj = jnp.where(flip, cw - 1 - jj, jj)
    # Pixel centres map to pixel centres: src = (dst + 0.5) / s - 0.5.
    y_h1, x_1w = (oy + ii + 0.5) / s - 0.5, (ox + jj + 0.5) / s - 0.5
    in_rows, in_cols = (y_h1 > -0.5) & (y_h1 < h - 0.5), (x_1w > -0.5) & (x_1w < w - 0.5)
    inside = in_rows & in_cols
    # Clamped to the example, not the canvas: its last row and column, sampled past their centres,
    # must not blend in the padding below and right of a smaller example.
    ys = jnp.broadcast_to(jnp.clip(y_h1, 0, h - 1), (ch, cw))
    xs = jnp.broadcast_to(jnp.clip(x_1w, 0, w - 1), (ch, cw))
    x_hwc = _sample_bilinear(image_HWC, ys, xs) / 255.0
    # Labels are only ever resampled with nearest neighbour.
    yn, xn = jnp.round(ys).astype(jnp.int32), jnp.round(xs).astype(jnp.int32)
    y_hw = jnp.where(inside, label_HW[yn, xn], ignore_label)
    x_hwc = jnp.where(inside[..., None], x_hwc, 0.0)

    b, c, sat = jitter
    x_hwc = x_hwc * (1 + b * (2 * u["brightness"] - 1))
    # The mean over the pixels inside the image: those outside are 0 here, and the inside ones form
    # a rectangle, rows times columns of them.
    mean = jnp.sum(x_hwc) / jnp.maximum(3 * jnp.sum(in_rows) * jnp.sum(in_cols), 1)
    x_hwc = (x_hwc - mean) * (1 + c * (2 * u["contrast"] - 1)) + mean
    # The channel mean as two adds: a mean over the 3-wide last axis became a YNNPACK reduction
    # on XLA:CPU, 2% of camvid_cpu's training step.
    gray = (x_hwc[..., 0:1] + x_hwc[..., 1:2] + x_hwc[..., 2:3]) * np.float32(1 / 3)
    x_hwc = (x_hwc - gray) * (1 + sat * (2 * u["saturation"] - 1)) + gray
    return jnp.clip(x_hwc, 0.0, 1.0), y_hw.astype(jnp.int32)


def augment(key, images_BHWC, labels_BHW, sizes_B2, augment_config, ignore_label: int):
    """Random scale, crop, flip and photometric jitter, per example, on device.

    Returns float32 images in [0, 1] [B, crop_h, crop_w, 3] and int32 labels
    [B, crop_h, crop_w]; pixels from outside the image are labelled ignore.
    """
    fn = jax.vmap(
        lambda u, i, lab, s: _augment_one(
            u,
            i,
            lab,
            s,
            crop=tuple(augment_config.crop_size),
            scale_range=tuple(augment_config.scale_range),
            hflip=bool(augment_config.hflip),
            jitter=(
                augment_config.brightness,
                augment_config.contrast,
                augment_config.saturation,
            ),
            ignore_label=ignore_label,
        )
    )
    # Every example's random numbers in one draw. Split into a key per example and then one per
    # number, they were most of the compiled augmentation's 93 operations (XLA:CPU; 29 now), each
    # a kernel of its own on a GPU.
    u_B7 = jax.random.uniform(key, (images_BHWC.shape[0], len(_DRAWS)))
    return fn(u_B7, images_BHWC, labels_BHW, sizes_B2)


# ----------------------------------------------------------------------------
# Evaluation batches: whole images at full resolution, unaugmented.


def eval_split(data_config, split: str) -> Split:
    """The split as evaluation scores it. With `data.max_size`, an image whose longer side exceeds it is
    shrunk as the training images are (the network's input), while its label stays at the file's own
    size: fcn.evaluate scales the logits back up to it, as `fcn.load(...).predict` does."""
    from fcn.data import get_source

    max_size = int(data_config.get("max_size", 0))
    if not max_size:
        return get_source(data_config).load(split)
    full = data_config.copy_and_resolve_references()
    full.max_size = 0
    source = get_source(full)
    examples = source.examples(split)

    def read(i: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = examples.read(i)
        return fit_image(image, max_size), label

    # Not kept decoded on disk (key_fn): that cache holds images and labels of one size.
    shrunk = dataclasses.replace(examples, read_fn=read, key_fn=None)
    workers, skip_bad = int(data_config.decode_workers), bool(data_config.skip_bad)
    return decode_all(shrunk, workers=workers, skip_bad=skip_bad, desc=f"{source.name} {split}")


def eval_batches(
    split: Split,
    batch_size: int,
    multiple: int | tuple[int, int],
    ignore_label: int,
    pad_mode: str = "reflect",
) -> Iterator[tuple[np.ndarray, np.ndarray, list[int], list[tuple[int, int]]]]:
    """Yield (images_BHWC uint8, labels_BHW uint8, example indices, true (H, W) image sizes).

    Images are grouped by size rounded up to `multiple` (the model's own
    padding multiple, so predictions equal those on the unpadded image; a pair
    (H, W) gives each axis its own);
    images are padded after their last row and column in `pad_mode`, labels
    with the ignore label, and a short last batch is filled with all-ignore
    examples so that every batch has the same shape. Images shrunk by
    `data.max_size` (`eval_split`: a label of another size) are batched apart,
    with all-ignore labels: they are scored at their labels' size.
    """
    groups: dict[tuple[int, int, bool], list[int]] = {}
    examples = list(zip(split.images, split.labels))
    mh, mw = (multiple, multiple) if isinstance(multiple, int) else multiple
    for n, (image, label) in enumerate(examples):
        h, w = image.shape[:2]
        groups.setdefault((h + -h % mh, w + -w % mw, label.shape != (h, w)), []).append(n)
    for (bh, bw, shrunk), members in groups.items():
        for start in range(0, len(members), batch_size):
            idx = members[start : start + batch_size]
            images = np.zeros((batch_size, bh, bw, 3), np.uint8)
            labels = np.full((batch_size, bh, bw), ignore_label, np.uint8)
            for row, n in enumerate(idx):
                image, label = examples[n]
                h, w = image.shape[:2]
                images[row] = np.pad(image, ((0, bh - h), (0, bw - w), (0, 0)), mode=pad_mode)
                if not shrunk:
                    labels[row, :h, :w] = label
            yield images, labels, idx, [examples[n][0].shape[:2] for n in idx]
