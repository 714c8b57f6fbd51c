"""The contract every data source fulfils: decoded uint8 examples, class names, splits."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

IGNORE_LABEL = 255


@dataclasses.dataclass(frozen=True)
class Split:
    """Decoded examples of one split, held in memory.

    images: uint8 arrays [H, W, 3]; labels: uint8 arrays [H, W] whose values are
    class ids in [0, num_classes) or the source's ignore label. names: one id per
    example (a file stem), used in error messages and reports.
    """

    images: Sequence[np.ndarray]
    labels: Sequence[np.ndarray]
    names: Sequence[str]

    def __len__(self) -> int:
        return len(self.images)


@dataclasses.dataclass(frozen=True)
class Source:
    """A segmentation dataset: what it is called, its classes, and how to load a split."""

    name: str
    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    load_fn: Callable[[str], Split]
    palette: np.ndarray  # uint8 [num_classes, 3], colours for pictures
    ignore_label: int = IGNORE_LABEL

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, split: str) -> Split:
        if split not in self.splits:
            raise ValueError(
                f"{self.name}: split {split!r} is not available; available splits: {', '.join(self.splits) or '(none)'}"
            )
        return self.load_fn(split)


def default_palette(num_classes: int) -> np.ndarray:
    """Distinct colours (the PASCAL VOC bit-interleaving scheme) for any class count."""
    palette = np.zeros((num_classes, 3), np.uint8)
    for k in range(num_classes):
        c, r, g, b = k + 1, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[k] = (r, g, b)
    return palette
