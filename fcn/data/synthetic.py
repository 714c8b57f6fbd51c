"""Procedural shapes with exact masks: a dataset that needs no files or network.

Each image has a textured background (a smooth colour gradient, two gratings
and pixel noise) and one to four shapes: circles, squares and triangles of
random size, rotation and colour, later ones occluding earlier ones. Each
class has its own band of hues (0.28 of the colour wheel, bands apart), so
colour is a strong cue for the class and the outline has to be found from the
image; shapes are always brighter than the background. A small U-Net learns it to a
high IoU within minutes on a CPU (configs/shapes.py). With hues independent of
the class, a small net took far longer to tell the shapes apart.

Deterministic: image i of a split depends only on the split name and i (so a
smaller count gives a prefix of a larger one), and train and val differ.
"""

from __future__ import annotations

import colorsys
import zlib

import numpy as np

from fcn.data.base import Examples, Source, Split, decode_all, default_palette
from fcn.data.images import DataError, fit_max_size, fitted_size

CLASS_NAMES = ("background", "circle", "square", "triangle")
MAX_SHAPES = 4
_SEED = 20240611  # changing it changes every synthetic dataset


def _split_seed(split: str) -> int:
    """A fixed seed per split name (crc32 is stable across runs, unlike hash())."""
    return zlib.crc32(split.encode())


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Dark textured background, float [H, W, 3] in about 20..140."""
    h, w = yy.shape
    base = rng.uniform(40, 100, size=3)
    tilt = rng.uniform(-25, 25, size=(2, 3))  # colour gradient across the image
    img = base + (yy / h - 0.5)[..., None] * tilt[0] + (xx / w - 0.5)[..., None] * tilt[1]
    for _ in range(2):  # gratings: structure that is neither flat nor a shape
        freq = rng.uniform(2, 10) / max(h, w)
        angle, phase = rng.uniform(0, 2 * np.pi, size=2)
        wave = np.cos(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        img = img + wave[..., None] * rng.uniform(5, 15, size=3)
    return img


def _inside(
    cls: int,
    cy: float,
    cx: float,
    r: float,
    angle: float,
    yy: np.ndarray,
    xx: np.ndarray,
) -> np.ndarray:
    """Boolean [H, W] mask of a shape; polygons as intersections of half-planes."""
    dy, dx = yy - cy, xx - cx
    if cls == 1:
        return dy * dy + dx * dx <= r * r
    # Square: inradius 0.89 r, triangle: circumradius 1.5 r, so all three have
    # about the same area and size does not give the class away.
    sides, inradius = (4, 0.89 * r) if cls == 2 else (3, 0.75 * r)
    inside = np.ones(yy.shape, bool)
    for k in range(sides):
        phi = angle + 2 * np.pi * k / sides
        inside &= np.cos(phi) * dx + np.sin(phi) * dy <= inradius
    return inside


def _shape_color(rng: np.random.Generator, cls: int) -> np.ndarray:
    """A bright colour, brighter than any background, in the class's band of hues."""
    hue = (cls / 3 + rng.uniform(-0.14, 0.14)) % 1.0
    sat, val = rng.uniform(0.3, 1.0), rng.uniform(0.75, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255


def make_example(seed: int, index: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image uint8 [H, W, 3] and exact label uint8 [H, W] of one synthetic example."""
    rng = np.random.default_rng([_SEED, seed, index])
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = _background(rng, yy, xx)
    label = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, MAX_SHAPES + 1)):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        r = rng.uniform(0.08, 0.2) * min(h, w)
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        inside = _inside(cls, cy, cx, r, rng.uniform(0, 2 * np.pi), yy, xx)
        img[inside] = _shape_color(rng, cls)
        label[inside] = cls
    img += rng.normal(0, 8, size=img.shape)  # noise on shapes too: no flat colours
    return np.clip(img, 0, 255).astype(np.uint8), label


def examples(split: str, count: int, size: tuple[int, int], max_size: int = 0) -> Examples:
    """count examples of split at size (H, W), shrunk to max_size when set, made when read."""
    seed = _split_seed(split)
    return Examples(
        names=[f"{split}_{i:05d}" for i in range(count)],
        read_fn=lambda i: fit_max_size(*make_example(seed, i, size), max_size),
        size_fn=lambda i: fitted_size(*size, max_size),
    )


def generate(split: str, count: int, size: tuple[int, int], max_size: int = 0, workers: int = 1) -> Split:
    """The examples of `examples(...)`, all made and held in memory."""
    return decode_all(examples(split, count, size, max_size), workers=workers, desc=f"synthetic {split}")


def synthetic_source(data_config) -> Source:
    """The synthetic source for a `config.data` ConfigDict (synthetic_size, synthetic_counts)."""
    size = tuple(data_config.synthetic_size)
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in size):
        raise DataError(f"data.synthetic_size={size!r}: expected H, W, integers of at least 8")
    h, w = size
    counts = {str(k): int(v) for k, v in data_config.synthetic_counts.items()}
    if not counts or min(counts.values()) < 1:
        raise DataError(
            f'data.synthetic_counts={counts}: expected a positive count per split, e.g. {{"train": 256, "val": 64}}'
        )
    max_size, workers = int(data_config.max_size), int(data_config.decode_workers)
    return Source(
        name="synthetic",
        class_names=CLASS_NAMES,
        splits=tuple(counts),
        examples_fn=lambda split: examples(split, counts[split], (h, w), max_size),
        load_fn=lambda split: generate(split, counts[split], (h, w), max_size, workers),
        palette=default_palette(len(CLASS_NAMES)),
        ignore_label=int(data_config.ignore_label),
    )
