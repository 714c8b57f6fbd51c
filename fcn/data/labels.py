"""Label values: a source's raw mask values mapped to class ids (`value_map`, `color_map`), and the
checks that the mapping's result is a class id or the ignore label, naming the file and value.
fcn.data.images reads masks with them; fcn.data.folder, fcn.data.tfds and fcn.config check configs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fcn.data.base import IGNORE_LABEL, DataError


def normalize_value_map(value_map: Mapping | None) -> dict[int, int]:
    """Turns a ConfigDict/dict with string or int keys into {raw value: class id}."""
    if not value_map:
        return {}
    result = {}
    for key, value in value_map.items():
        try:
            result[int(str(key).strip())] = int(value)
        except (TypeError, ValueError):
            raise DataError(
                f"data.value_map entry {key!r}: {value!r} is not raw mask value -> class id "
                'with integers on both sides, e.g. {"255": 1}'
            ) from None
    return result


def normalize_color_map(color_map: Sequence | None, num_classes: int) -> np.ndarray | None:
    """Checks data.color_map (one [r, g, b] per class id, in order, then any colours that value_map
    maps) and returns it as int32 [N, 3]."""
    if color_map is None or len(color_map) == 0:
        return None
    try:
        colors = np.asarray([[int(v) for v in c] for c in color_map], np.int64)
    except (TypeError, ValueError):
        raise DataError(f"data.color_map={color_map!r}: expected one (r, g, b) per class") from None
    if colors.ndim != 2 or colors.shape[1] != 3 or colors.min() < 0 or colors.max() > 255:
        raise DataError(f"data.color_map={color_map!r}: expected (r, g, b) triples in 0..255")
    if not num_classes <= len(colors) <= 256:
        raise DataError(
            f"data.color_map has {len(colors)} colours but there are {num_classes} classes; "
            "give one colour per class, in class-id order (then at most the colours that make 256)"
        )
    if len(np.unique(colors, axis=0)) != len(colors):
        raise DataError(f"data.color_map={color_map!r}: the same colour is given twice")
    return colors.astype(np.int32)


def check_labels_config(
    num_classes: int, ignore_label: int, value_map: Mapping[int, int], color_map: np.ndarray | None = None
) -> None:
    """Fails early on a class count, ignore label, value_map or color_map (normalized) that cannot work."""
    if not 1 <= num_classes <= 255:
        raise DataError(f"{num_classes} classes: expected between 1 and 255")
    if not 0 <= ignore_label <= 255 or ignore_label < num_classes:
        raise DataError(
            f"data.ignore_label={ignore_label} must be in {num_classes}..255 "
            f"(not a class id; there are {num_classes} classes)"
        )
    for raw, target in value_map.items():
        if not (0 <= target < num_classes or target == ignore_label):
            raise DataError(
                f"data.value_map maps {raw} to {target}, which is neither a class id "
                f"(0..{num_classes - 1}) nor the ignore label {ignore_label}"
            )
    extra = [] if color_map is None else [i for i in range(num_classes, len(color_map)) if i not in value_map]
    if extra:
        raise DataError(
            f"data.color_map has {len(color_map)} colours for {num_classes} classes, but data.value_map "
            f"does not map {', '.join(map(str, extra))}: colours past the classes are read as their position "
            f"""in the list; map each, e.g. to the ignore label: --config.data.value_map='{{"{extra[0]}": """
            f"""{ignore_label}}}'"""
        )


def _apply_value_map(raw: np.ndarray, value_map: Mapping[int, int]) -> np.ndarray:
    """raw values -> mapped values; values without an entry are kept."""
    if raw.dtype == np.uint8:  # the common case: a 256-entry lookup table, no sort
        lut = np.arange(256, dtype=np.int64)
        for key, value in value_map.items():
            if 0 <= key < 256:
                lut[key] = value
        return lut[raw]
    uniq, inverse = np.unique(raw, return_inverse=True)
    mapped = np.asarray([value_map.get(int(u), int(u)) for u in uniq], np.int64)
    return mapped[inverse.reshape(raw.shape)]


def _present_values(values: np.ndarray) -> list[int]:
    """Sorted distinct values; a bincount (no sort) when they are small and non-negative."""
    if values.size == 0:
        return []
    if values.dtype.kind in "ub" or (values.min() >= 0 and values.max() < 1 << 16):
        return [int(v) for v in np.flatnonzero(np.bincount(values.ravel()))]
    return [int(v) for v in np.unique(values)]


def map_labels(
    raw: np.ndarray,
    *,
    name: str,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    value_map: Mapping[int, int] | None = None,
) -> np.ndarray:
    """Applies value_map to raw mask values and checks them; returns uint8 [H, W]."""
    value_map = normalize_value_map(value_map)
    if raw.dtype.kind not in "iub":
        raise DataError(f"{name}: mask has dtype {raw.dtype}, expected integer values")
    if value_map:
        raw = _apply_value_map(raw, value_map)
    present = _present_values(raw)
    if not value_map and num_classes == 2 and 255 in present and set(present) <= {0, 255}:
        read_as = "the ignore label" if ignore_label == 255 else f"no class (the ignore label is {ignore_label})"
        raise DataError(
            f"{name}: mask values are only 0 and 255 while there are 2 classes, so 255 "
            f"would be read as {read_as} and no pixel as class 1. If 255 marks the "
            """foreground, add --config.data.value_map='{"255": 1}' (in a config file: """
            """config.data.value_map = {"255": 1}); if 255 really means 'ignore', set """
            f"""value_map to {{"255": {ignore_label}}}"""
        )
    bad = [v for v in present if not (0 <= v < num_classes or v == ignore_label)]
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise DataError(
            f"{name}: label values {shown} are neither class ids (0..{num_classes - 1}) "
            f"nor the ignore label {ignore_label}; map them with data.value_map "
            f"""(e.g. --config.data.value_map='{{"{bad[0]}": {ignore_label}}}') """
            "or check data.class_names"
        )
    return raw.astype(np.uint8)
