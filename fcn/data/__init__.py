"""Data sources: CamVid, the user's folders, TFDS datasets, synthetic shapes.

    source = get_source(config.data)
    split = source.load("train")  # images uint8 [H, W, 3], labels uint8 [H, W]
    examples = source.examples("train")  # the same, decoded one at a time: examples.read(i)

Training data is held in memory or streamed: `pipeline.training_data`.
TensorFlow is imported only when a TFDS split is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from fcn.data.base import IGNORE_LABEL, DataError, Examples, Source, Split, default_palette

__all__ = [
    "IGNORE_LABEL",
    "SOURCES",
    "DataError",
    "Examples",
    "Source",
    "Split",
    "default_palette",
    "get_source",
]


def _camvid(data_config) -> Source:
    from fcn.data.camvid import camvid_source

    return camvid_source(data_config)


def _folder(data_config) -> Source:
    from fcn.data.folder import folder_source

    return folder_source(data_config)


def _tfds(data_config) -> Source:
    from fcn.data.tfds import tfds_source

    return tfds_source(data_config)


def _synthetic(data_config) -> Source:
    from fcn.data.synthetic import synthetic_source

    return synthetic_source(data_config)


SOURCES: dict[str, Callable[..., Source]] = {
    "camvid": _camvid,
    "folder": _folder,
    "tfds": _tfds,
    "synthetic": _synthetic,
}


def get_source(data_config) -> Source:
    """The data source named by `data_config.source` (a `config.data` ConfigDict)."""
    make = SOURCES.get(data_config.source)
    if make is None:
        raise DataError(
            f"data.source={data_config.source!r} is not a known source; valid sources: {', '.join(SOURCES)}"
        )
    return make(data_config)


def __getattr__(name: str):
    # fcn.data.images and fcn.data.labels on first use: `import fcn; fcn.data.images.read_mask(...)` worked
    # while fcn/__init__.py imported the predictor eagerly, which imported them; it imports them lazily now
    if name in ("images", "labels"):
        return importlib.import_module(f"{__name__}.{name}")  # which makes it this package's attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
