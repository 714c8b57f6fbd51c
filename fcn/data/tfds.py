"""Any TensorFlow Datasets dataset with an image and a segmentation-mask feature.

TensorFlow and tensorflow-datasets are imported only when a split is loaded,
so `import fcn.data` stays fast and works where they are not installed. TF is
kept off the GPUs: it is only decoding, and JAX needs the accelerator memory.

A split is read once, in order, keeping image and mask features still encoded
(PNG / JPEG bytes, `tfds.decode.SkipDecoding`); each example is decoded when
asked, by the feature's own decoder, so the in-memory and the streamed forms
hold the same pixels. Streaming a TFDS split therefore still holds its encoded
bytes in memory (features that are not encoded images are held as arrays).

Datasets whose mask values are not already 0..K-1 get an entry in
`LABEL_MAPS`; any other dataset needs `data.class_names` (and `data.value_map`
if its mask values need mapping). Colour-coded (RGB) masks need `data.color_map`,
read as for image/mask folders.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Mapping

import numpy as np

from fcn.data.base import Examples, Source, decode_all, default_palette
from fcn.data.images import (
    DataError,
    _colors_to_ids,
    as_rgb,
    fit_max_size,
    fitted_size,
    gray_rgb_mask,
    too_large_error,
    warn_if_large,
)
from fcn.data.labels import check_labels_config, map_labels, normalize_color_map, normalize_value_map


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
    except ImportError as e:  # a DataError: the commands say it in one line, not a traceback
        raise DataError(
            f"data.source='tfds' needs tensorflow and tensorflow-datasets ({e}): pip install "
            "tensorflow-cpu tensorflow-datasets (in fcn's checkout: pip install '.[tfds]')"
        ) from e
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF already initialised its devices; too late to hide them, harmless
    return tfds


def _data_dir(data_config) -> str | None:
    """data.path as TFDS's data_dir, '~' expanded as camvid and folder do (TFDS would make a folder named '~')."""
    return os.path.expanduser(data_config.path) or None


def _builder(tfds, data_config):
    """tfds.builder for data.tfds_name; a name (or version) it cannot find is a DataError naming the key,
    not tfds's traceback and its list of every dataset it knows."""
    name, path = data_config.tfds_name, data_config.path
    try:
        return tfds.builder(name, data_dir=_data_dir(data_config))
    except (ValueError, AssertionError) as e:  # DatasetNotFoundError; a version it lacks: AssertionError
        text = str(e)
        if isinstance(e, tfds.core.registered.DatasetNotFoundError):
            close = re.search(r"Did you mean: \S+ -> (\S+)", text)
            text = "no such tensorflow-datasets dataset" + (f" (did you mean {close[1]}?)" if close else "")
            if path:
                text += f", nor one prepared in data.path={path!r}"
        raise DataError(f"data.tfds_name={name!r}: {' '.join(text.split())}") from e


def _example_name(example: Mapping, split: str, index: int) -> str:
    name = example.get("file_name")
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace")
    return str(name) if name is not None else f"{split}[{index}]"


def _encoded_size(value, name: str) -> tuple[int, int]:
    """(H, W) of an encoded image from its header, or of an array."""
    if not isinstance(value, bytes):
        return tuple(np.shape(value)[:2])
    from PIL import Image

    try:
        with Image.open(io.BytesIO(value)) as img:
            w, h = img.size
    except Image.DecompressionBombError as e:  # not an OSError: it would end in a traceback
        raise too_large_error(name, e) from e
    except (OSError, ValueError) as e:
        raise DataError(f"{name}: cannot read the image header ({e})") from e
    warn_if_large(name, (w, h))
    return h, w


def _read_split(data_config, labels: LabelMap, color_map, split: str) -> Examples:
    """The split's examples, read once with images still encoded, decoded when asked."""
    tfds = _import_tfds()
    import tensorflow as tf

    from fcn.progress import progress_bar

    tfds_split = data_config.tfds_splits[split]
    image_key, mask_key = data_config.tfds_image_key, data_config.tfds_mask_key
    builder = _builder(tfds, data_config)
    features = builder.info.features
    for key, field in ((image_key, "tfds_image_key"), (mask_key, "tfds_mask_key")):
        if key not in features:
            raise DataError(
                f"data.{field}={key!r} is not a feature of {data_config.tfds_name}; "
                f"features: {', '.join(sorted(features))}"
            )
    encoded = [k for k in (image_key, mask_key) if isinstance(features[k], tfds.features.Image)]
    try:
        ds = tfds.load(
            data_config.tfds_name,
            split=tfds_split,
            data_dir=_data_dir(data_config),
            shuffle_files=False,
            decoders={k: tfds.decode.SkipDecoding() for k in encoded} or None,
        )
    except ValueError as e:
        # "Unknown split 'validation'. Should be one of ['train', 'test'].", a slice it cannot parse (two
        # lines), "Instruction [] corresponds to no data!" (train[10:] of 10): none names the config key.
        text = " ".join(str(e).split())
        if "corresponds to no data" in text:
            text = f"selects no examples of {data_config.tfds_name}"
        elif "split" in text.lower():
            text += f" ({data_config.tfds_name})"
        else:
            raise
        raise DataError(f"data.tfds_splits.{split}={tfds_split!r}: {text}") from e
    except (tfds.download.DownloadError, OSError) as e:
        # A first use downloads and prepares it: requests' errors are OSErrors (offline, after TFDS's own
        # retries; a host that does not resolve), DownloadError an HTTP status; a full disk is an OSError too.
        name = data_config.tfds_name
        raise DataError(
            f"data.tfds_name={name!r}: downloading or preparing it in {builder.data_dir} failed "
            f"({' '.join(str(e).split())}); TFDS needs the network the first time, or set data.path to a TFDS "
            f"data_dir where it is prepared already (`tfds build {_base_name(name)} --data_dir DIR` on a machine "
            "with the network)"
        ) from e
    except AssertionError as e:
        # A dataset downloaded by hand (cityscapes: behind a registration) whose manual folder is empty: TFDS's
        # AssertionError, a traceback, says where its files go and how to get them.
        if not str(e).startswith("Manual directory"):
            raise
        raise DataError(f"data.tfds_name={data_config.tfds_name!r}: {' '.join(str(e).split())}") from e
    images, masks, names = [], [], []
    desc = f"tfds {data_config.tfds_name} {tfds_split}"
    for i, ex in enumerate(progress_bar(iterable=tfds.as_numpy(ds), desc=desc)):
        names.append(_example_name(ex, split, i))
        images.append(ex[image_key])
        masks.append(ex[mask_key])
    ignore, max_size = int(data_config.ignore_label), int(data_config.max_size)

    def decoded(value, key: str, name: str) -> np.ndarray:
        if not isinstance(value, bytes):
            return np.asarray(value)
        try:  # as tfds.load would decode it
            return features[key].decode_example(tf.constant(value)).numpy()
        except tf.errors.OpError as e:  # a DataError, which data.skip_bad skips: TF's own error was fatal
            why = e.message.split("}} ")[-1].split(" [Op:")[0]  # TF's words, without its op's names
            raise DataError(f"{name}: {key!r} is a corrupt or truncated image ({why})") from e

    def read(i: int) -> tuple[np.ndarray, np.ndarray]:
        name = names[i]
        image = as_rgb(decoded(images[i], image_key, name), name)
        raw = decoded(masks[i], mask_key, name)
        if raw.ndim == 3 and raw.shape[-1] == 1:
            raw = raw[..., 0]
        elif raw.ndim == 3 and raw.shape[-1] in (3, 4) and color_map is not None:  # RGBA: alpha dropped
            raw = _colors_to_ids(raw[..., :3], name, color_map, ignore)
        elif raw.ndim == 3 and raw.shape[-1] in (3, 4):  # tfds.features.Image() is RGB unless told otherwise
            raw = gray_rgb_mask(raw[..., :3], f"{name} (data.tfds_mask_key={mask_key!r})")
        elif raw.ndim == 3:
            raise DataError(
                f"{name}: the mask (data.tfds_mask_key={mask_key!r}) has {raw.shape[-1]} channels, where one of "
                "class ids, or three of colours that data.color_map lists (and an alpha channel), is read"
            )
        if raw.shape != image.shape[:2]:
            raise DataError(f"{name}: image is {image.shape[:2]} but mask is {raw.shape}, expected H, W")
        label = map_labels(
            raw,
            name=name,
            num_classes=len(labels.class_names),
            ignore_label=ignore,
            value_map=labels.value_map,
        )
        return fit_max_size(image, label, max_size)

    def size(i: int) -> tuple[int, int]:
        image_hw, mask_hw = _encoded_size(images[i], names[i]), _encoded_size(masks[i], names[i])
        if image_hw != mask_hw:
            raise DataError(f"{names[i]}: image is {image_hw} but mask is {mask_hw}, expected H, W")
        return fitted_size(*image_hw, max_size)

    return Examples(names=names, read_fn=read, size_fn=size)


def tfds_source(data_config) -> Source:
    """The TFDS source for a `config.data` ConfigDict (tfds_name, tfds_splits, ...)."""
    labels = label_map(data_config)
    ignore = int(data_config.ignore_label)
    color_map = normalize_color_map(data_config.color_map, len(labels.class_names))
    check_labels_config(len(labels.class_names), ignore, labels.value_map, color_map)
    splits = tuple(data_config.tfds_splits.keys())
    if not splits:
        raise DataError("data.tfds_splits is empty: map split names to TFDS splits")
    return Source(
        name=f"tfds {data_config.tfds_name}",
        class_names=labels.class_names,
        splits=splits,
        examples_fn=lambda split: _read_split(data_config, labels, color_map, split),
        load_fn=lambda split: decode_all(
            _read_split(data_config, labels, color_map, split),
            workers=int(data_config.decode_workers),
            skip_bad=bool(data_config.skip_bad),
            desc=f"tfds {data_config.tfds_name} {split}",
        ),
        palette=(
            default_palette(len(labels.class_names)) if color_map is None else color_map[: len(labels.class_names)]
        ).astype(np.uint8),
        ignore_label=ignore,
    )
