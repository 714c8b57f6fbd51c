"""From decoded examples to device batches: in-memory arrays, data order, augmentation.

Training data is decoded once and held in memory as one uint8 canvas (CamVid
train: 367 x 360 x 480 x 4 bytes, about 250 MB). Each step the host only
gathers B rows by index and hands them to the device; augmentation (random
scale, crop, flip, photometric jitter) runs on the accelerator inside the
jitted training step, so the host never becomes the bottleneck.

The data order is a pure function of (seed, step): epoch e visits the examples
in `permutation(seed, e)`, and step s takes items [s*B, (s+1)*B) of that
endless stream. A resumed run therefore sees exactly the batches an unbroken
run would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fcn.data.base import Split
from fcn.data.images import rescale_pair


@dataclasses.dataclass(frozen=True)
class Canvas:
    """A split stacked into fixed-shape arrays; smaller examples padded at bottom/right.

    images_NHWC uint8 (padding 0), labels_NHW uint8 (padding = ignore label),
    sizes_N2 int32 true (H, W) of each example.
    """

    images_NHWC: np.ndarray
    labels_NHW: np.ndarray
    sizes_N2: np.ndarray

    def __len__(self) -> int:
        return len(self.images_NHWC)


def stack(split: Split, ignore_label: int, scale: float = 1.0) -> Canvas:
    """Stack a split into one canvas (padding varied sizes up to the largest).

    scale: resize every example by this factor first (the model's
    `input_scale`, so training sees what the network sees at evaluation).
    """
    pairs = [rescale_pair(i, lab, scale) for i, lab in zip(split.images, split.labels)]
    sizes = np.array([lab.shape for _, lab in pairs], np.int32).reshape(-1, 2)
    h, w = sizes.max(axis=0) if len(pairs) else (1, 1)
    images = np.zeros((len(pairs), h, w, 3), np.uint8)
    labels = np.full((len(pairs), h, w), ignore_label, np.uint8)
    for n, (image, label) in enumerate(pairs):
        images[n, : label.shape[0], : label.shape[1]] = image
        labels[n, : label.shape[0], : label.shape[1]] = label
    return Canvas(images, labels, sizes)


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
    """Bilinear samples of image at fractional (y, x); coordinates clamped to the image."""
    h, w = image_HWC.shape[:2]
    y0 = jnp.clip(jnp.floor(y_hw), 0, h - 1)
    x0 = jnp.clip(jnp.floor(x_hw), 0, w - 1)
    y1, x1 = jnp.minimum(y0 + 1, h - 1), jnp.minimum(x0 + 1, w - 1)
    wy = jnp.clip(y_hw - y0, 0, 1)[..., None]
    wx = jnp.clip(x_hw - x0, 0, 1)[..., None]
    y0, x0, y1, x1 = (v.astype(jnp.int32) for v in (y0, x0, y1, x1))
    img = image_HWC.astype(jnp.float32)
    top = img[y0, x0] * (1 - wx) + img[y0, x1] * wx
    bottom = img[y1, x0] * (1 - wx) + img[y1, x1] * wx
    return top * (1 - wy) + bottom * wy


def _augment_one(key, image_HWC, label_HW, size_2, *, crop, scale_range, hflip, jitter, ignore_label):
    ch, cw = crop
    k_scale, k_y, k_x, k_flip, k_b, k_c, k_s = jax.random.split(key, 7)
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    s = jnp.exp(jax.random.uniform(k_scale, (), minval=lo, maxval=hi))
    h, w = size_2[0].astype(jnp.float32), size_2[1].astype(jnp.float32)
    # Place the crop window in the rescaled image (or the image in the window
    # when the image is smaller): offset uniform over all valid placements.
    span_y, span_x = h * s - ch, w * s - cw
    oy = jnp.minimum(span_y, 0) + jax.random.uniform(k_y) * jnp.abs(span_y)
    ox = jnp.minimum(span_x, 0) + jax.random.uniform(k_x) * jnp.abs(span_x)
    oy, ox = jnp.floor(oy), jnp.floor(ox)
    ii = jnp.arange(ch, dtype=jnp.float32)[:, None]
    jj = jnp.arange(cw, dtype=jnp.float32)[None, :]
    flip = hflip & jax.random.bernoulli(k_flip)
    jj = jnp.where(flip, cw - 1 - jj, jj)
    # Pixel centres map to pixel centres: src = (dst + 0.5) / s - 0.5.
    ys = jnp.broadcast_to((oy + ii + 0.5) / s - 0.5, (ch, cw))
    xs = jnp.broadcast_to((ox + jj + 0.5) / s - 0.5, (ch, cw))
    inside = (ys > -0.5) & (ys < h - 0.5) & (xs > -0.5) & (xs < w - 0.5)
    x_hwc = _sample_bilinear(image_HWC, ys, xs) / 255.0
    # Labels are only ever resampled with nearest neighbour.
    yn = jnp.clip(jnp.round(ys), 0, image_HWC.shape[0] - 1).astype(jnp.int32)
    xn = jnp.clip(jnp.round(xs), 0, image_HWC.shape[1] - 1).astype(jnp.int32)
    y_hw = jnp.where(inside, label_HW[yn, xn], ignore_label)
    x_hwc = jnp.where(inside[..., None], x_hwc, 0.0)

    b, c, sat = jitter
    x_hwc = x_hwc * (1 + jax.random.uniform(k_b, minval=-b, maxval=b))
    mean = jnp.sum(x_hwc * inside[..., None]) / jnp.maximum(3 * jnp.sum(inside), 1)
    x_hwc = (x_hwc - mean) * (1 + jax.random.uniform(k_c, minval=-c, maxval=c)) + mean
    gray = jnp.mean(x_hwc, axis=-1, keepdims=True)
    x_hwc = (x_hwc - gray) * (1 + jax.random.uniform(k_s, minval=-sat, maxval=sat)) + gray
    return jnp.clip(x_hwc, 0.0, 1.0), y_hw.astype(jnp.int32)


def augment(key, images_BHWC, labels_BHW, sizes_B2, augment_config, ignore_label: int):
    """Random scale, crop, flip and photometric jitter, per example, on device.

    Returns float32 images in [0, 1] [B, crop_h, crop_w, 3] and int32 labels
    [B, crop_h, crop_w]; pixels from outside the image are labelled ignore.
    """
    fn = jax.vmap(
        lambda k, i, lab, s: _augment_one(
            k,
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
    keys = jax.random.split(key, images_BHWC.shape[0])
    return fn(keys, images_BHWC, labels_BHW, sizes_B2)


# ----------------------------------------------------------------------------
# Evaluation batches: whole images at full resolution, unaugmented.


def eval_batches(
    split: Split,
    batch_size: int,
    multiple: int,
    ignore_label: int,
    pad_mode: str = "reflect",
) -> Iterator[tuple[np.ndarray, np.ndarray, list[int], list[tuple[int, int]]]]:
    """Yield (images_BHWC uint8, labels_BHW uint8, example indices, true (H, W) sizes).

    Images are grouped by size rounded up to `multiple` (the model's own
    padding multiple, so predictions equal those on the unpadded image);
    images are padded after their last row and column in `pad_mode`, labels
    with the ignore label, and a short last batch is filled with all-ignore
    examples so that every batch has the same shape.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    examples = list(zip(split.images, split.labels))
    for n, (_, label) in enumerate(examples):
        h, w = label.shape
        groups.setdefault((h + -h % multiple, w + -w % multiple), []).append(n)
    for (bh, bw), members in groups.items():
        for start in range(0, len(members), batch_size):
            idx = members[start : start + batch_size]
            images = np.zeros((batch_size, bh, bw, 3), np.uint8)
            labels = np.full((batch_size, bh, bw), ignore_label, np.uint8)
            for row, n in enumerate(idx):
                image, label = examples[n]
                h, w = label.shape
                images[row] = np.pad(image, ((0, bh - h), (0, bw - w), (0, 0)), mode=pad_mode)
                labels[row, :h, :w] = label
            yield images, labels, idx, [examples[n][1].shape for n in idx]
