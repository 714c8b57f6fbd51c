"""Any TensorFlow Datasets dataset with an image and a segmentation-mask feature.

TensorFlow and tensorflow-datasets are imported only when a split is loaded,
so `import fcn.data` stays fast and works where they are not installed. TF is
kept off the GPUs: it is only decoding, and JAX needs the accelerator memory.

Datasets whose mask values are not already 0..K-1 get an entry in
`LABEL_MAPS`; any other dataset needs `data.class_names` (and `data.value_map`
if its mask values need mapping).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from fcn.data.base import Source, Split, default_palette
from fcn.data.images import (
    DataError,
    as_rgb,
    check_labels_config,
    fit_max_size,
    map_labels,
    normalize_value_map,
)


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Class names of a TFDS dataset and how its raw mask values map to class ids."""

    class_names: tuple[str, ...]
    value_map: Mapping[int, int]


LABEL_MAPS = {
    # Trimaps: 1 = pet, 2 = background, 3 = border ("not classified").
    "oxford_iiit_pet": LabelMap(("pet", "background", "border"), {1: 0, 2: 1, 3: 2}),
}


def _base_name(tfds_name: str) -> str:
    """'oxford_iiit_pet:4.*.*' -> 'oxford_iiit_pet' (config and version dropped)."""
    return tfds_name.split(":")[0].split("/")[0]


def label_map(data_config) -> LabelMap:
    """Class names and value map: data.class_names wins, else the built-in table.

    With the table, data.value_map entries are added on top of it, so e.g.
    {"3": 255} ignores the pet border.
    """
    user_map = normalize_value_map(data_config.value_map)
    if data_config.class_names:
        return LabelMap(tuple(str(n) for n in data_config.class_names), user_map)
    known = LABEL_MAPS.get(_base_name(data_config.tfds_name))
    if known is None:
        raise DataError(
            f"data.tfds_name={data_config.tfds_name!r} has no built-in label map "
            f"(known: {', '.join(sorted(LABEL_MAPS))}); set data.class_names, one name "
            "per class id, and data.value_map if the mask values are not 0..K-1"
        )
    return LabelMap(known.class_names, {**known.value_map, **user_map})


def _import_tfds():
    """Imports TF (GPUs hidden) and tensorflow_datasets, with an actionable error."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"data.source='tfds' needs tensorflow and tensorflow-datasets ({e}); "
            "install them with: pip install tensorflow-cpu tensorflow-datasets"
        ) from e
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF already initialised its devices; too late to hide them, harmless
    return tfds


def _example_name(example: Mapping, split: str, index: int) -> str:
    name = example.get("file_name")
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace")
    return str(name) if name is not None else f"{split}[{index}]"


def _load_split(data_config, labels: LabelMap, split: str) -> Split:
    tfds = _import_tfds()
    from tqdm import tqdm

    tfds_split = data_config.tfds_splits[split]
    image_key, mask_key = data_config.tfds_image_key, data_config.tfds_mask_key
    ds = tfds.load(
        data_config.tfds_name,
        split=tfds_split,
        data_dir=data_config.path or None,
        shuffle_files=False,
    )
    for key, field in ((image_key, "tfds_image_key"), (mask_key, "tfds_mask_key")):
        if key not in ds.element_spec:
            raise DataError(
                f"data.{field}={key!r} is not a feature of {data_config.tfds_name}; "
                f"features: {', '.join(sorted(ds.element_spec))}"
            )
    ignore = int(data_config.ignore_label)
    images, masks, names = [], [], []
    desc = f"tfds {data_config.tfds_name} {tfds_split}"
    for i, ex in enumerate(tqdm(tfds.as_numpy(ds), desc=desc, disable=None)):
        name = _example_name(ex, split, i)
        image = as_rgb(np.asarray(ex[image_key]), name)
        raw = np.asarray(ex[mask_key])
        if raw.ndim == 3 and raw.shape[-1] == 1:
            raw = raw[..., 0]
        if raw.shape != image.shape[:2]:
            raise DataError(f"{name}: image is {image.shape[:2]} but mask is {raw.shape}, expected H, W")
        label = map_labels(
            raw,
            name=name,
            num_classes=len(labels.class_names),
            ignore_label=ignore,
            value_map=labels.value_map,
        )
        image, label = fit_max_size(image, label, int(data_config.max_size))
        images.append(image)
        masks.append(label)
        names.append(name)
    return Split(images=images, labels=masks, names=names)


def tfds_source(data_config) -> Source:
    """The TFDS source for a `config.data` ConfigDict (tfds_name, tfds_splits, ...)."""
    labels = label_map(data_config)
    ignore = int(data_config.ignore_label)
    check_labels_config(len(labels.class_names), ignore, labels.value_map)
    splits = tuple(data_config.tfds_splits.keys())
    if not splits:
        raise DataError("data.tfds_splits is empty: map split names to TFDS splits")
    return Source(
        name=f"tfds {data_config.tfds_name}",
        class_names=labels.class_names,
        splits=splits,
        load_fn=lambda split: _load_split(data_config, labels, split),
        palette=default_palette(len(labels.class_names)),
        ignore_label=ignore,
    )
