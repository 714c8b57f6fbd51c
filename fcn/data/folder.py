"""The user's own images and masks, from a folder. Nothing is written there.

Two layouts under `data.path`, pairing files by stem (`images/a.jpg` with
`masks/a.png`):

    images/ masks/                     one pool; `data.val_fraction` held out as val
    train/images train/masks [val/...] splits as folders (test/ too); without
    val/, val is held out of train the same way; both layouts at once are an error

The held-out stems are the round(val_fraction * n) with the smallest SHA-256 of
their name (in Unicode's composed form, as they pair), so the choice is
deterministic and needs no seed. Adding a file moves at most one other between
train and val (the one it displaces from val, or the next one in when the count
grows), so a run evaluated after files were added may score one it trained on.
The pairing (`pair_by_stem`) and the pairs as examples (`pair_examples`, read by
fcn.data.images) serve the CamVid source too.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fcn.data import images, labels as label_values
from fcn.data.base import IGNORE_LABEL, Examples, Source, Split, decode_all, default_palette
from fcn.data.images import DataError, PathLike

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "val", "test")
_LAYOUT = "images/ and masks/, or train/images and train/masks (and val/...)"

Pairs = list[tuple[Path, Path]]


def _shown(items: Sequence[str], n: int = 5) -> str:
    """The first n of items, comma-separated, with how many there are in all when there are more."""
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _stem(path: Path) -> str:
    """A file's stem for pairing, in Unicode's composed form (NFC): macOS has written names decomposed
    (NFD), so `café.jpg` from one tool and `café.png` from another are one stem, as they look."""
    return unicodedata.normalize("NFC", path.stem)


def _files_by_stem(folder: Path, suffixes: tuple[str, ...], what: str, *, expected: str = "") -> dict[str, Path]:
    """The files of `folder` with one of `suffixes` (any case), by stem (`_stem`). Hidden files and
    subfolders are not data; a link to nothing is listed, for reading to name it. An error names
    the folder when it is missing, holds none of them (listing what it holds), or holds two for one
    stem. `what`: the files' noun ("mask"); `expected`: the layout, for the message when the folder
    is missing."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found" + (f" (expected {expected})" if expected else ""))
    files: dict[str, Path] = {}
    others, subfolders = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue  # .DS_Store and the like
        if p.is_dir():
            subfolders.append(p.name + "/")
        elif p.suffix.lower() not in suffixes:
            others.append(p.name)
        elif _stem(p) in files:
            raise DataError(f"{folder}: two {what} files for stem {p.stem!r}: {files[_stem(p)].name}, {p.name}")
        else:
            files[_stem(p)] = p
    if not files:
        extra = f"; other files there: {_shown(others)}" if others else ""
        extra += f"; subfolders there, not searched: {_shown(subfolders)}" if subfolders else ""
        raise DataError(f"{folder}: no {what} files ({', '.join(suffixes)}){extra}")
    return files


def pair_by_stem(
    image_dir: Path,
    image_suffixes: tuple[str, ...],
    mask_dir: Path,
    mask_suffixes: tuple[str, ...],
    *,
    nouns: tuple[str, str] = ("image", "mask"),
    expected: str = "",
) -> list[tuple[Path, Path]]:
    """(image, mask) paths paired by stem (`images/a.jpg` with `masks/a.png`), sorted by stem.
    A file of either folder without a partner is an error that names both folders and the stems."""
    image_files = _files_by_stem(image_dir, image_suffixes, nouns[0], expected=expected)
    mask_files = _files_by_stem(mask_dir, mask_suffixes, nouns[1], expected=expected)
    sides = [(image_dir, image_files, nouns[0], image_suffixes), (mask_dir, mask_files, nouns[1], mask_suffixes)]
    problems, alone_of = [], []
    for (a_dir, a, a_noun, _), (b_dir, b, b_noun, b_suffixes) in (sides, sides[::-1]):
        alone = sorted(a.keys() - b.keys())
        alone_of.append((alone, a, a_noun))
        if alone:
            # Files of those stems in a format not read (a JPEG mask) are named: the user sees them there.
            unread = sorted(p.name for p in b_dir.iterdir() if _stem(p) in set(alone) and not p.name.startswith("."))
            hint = f" ({_shown(unread)}: not read as {b_noun} files, which end in {', '.join(b_suffixes)})"
            problems.append(
                f"{a_dir}: {len(alone)} {a_noun}(s) with no {b_noun} of the same stem in {b_dir}: {_shown(alone)}"
                + (hint if unread else "")
            )
    if problems:
        raise DataError("; and ".join(problems) + _renaming(*alone_of) + _renaming(*alone_of[::-1]))
    return [(image_files[s], mask_files[s]) for s in sorted(image_files)]


def _renaming(short: tuple[list[str], dict[str, Path], str], long: tuple[list[str], dict[str, Path], str]) -> str:
    """What to rename when every unpaired stem of one side, `long`, is one of the other side's, `short`,
    with the same text added (`a_mask.png` for `a.jpg`; CamVid's raw release: `a_L.png`), or ''.
    Each side: (its unpaired stems, its files by stem, its noun)."""
    (short_stems, _, short_noun), (long_stems, long_files, long_noun) = short, long
    shorts = set(short_stems)
    for stem in short_stems:
        added = long_stems[0][len(stem) :] if long_stems and long_stems[0].startswith(stem) else ""
        if added and all(s.endswith(added) and s[: -len(added)] in shorts for s in long_stems):
            example = long_files[long_stems[0]]
            return (
                f"; the {long_noun}s' stems are the {short_noun}s' with {added!r} added, and files pair by the "
                f"same stem: rename {example.name} to {stem}{example.suffix}, and so on"
            )
    return ""


def pair_files(folder: Path) -> Pairs:
    """(image, mask) pairs of folder/images and folder/masks, sorted by stem."""
    return pair_by_stem(folder / "images", IMAGE_SUFFIXES, folder / "masks", MASK_SUFFIXES, expected=_LAYOUT)


def hold_out(pairs: Pairs, val_fraction: float) -> tuple[Pairs, Pairs]:
    """Splits pairs into (train, val); val is round(val_fraction * n), at least 1."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction}: expected 0 <= value < 1")
    if val_fraction == 0:
        return pairs, []
    if len(pairs) < 2:
        raise DataError(
            f"only {len(pairs)} image/mask pair: cannot hold out a val split; add "
            "more, add a val/ folder, or set --config.data.val_fraction=0"
        )
    n_val = min(len(pairs) - 1, max(1, round(val_fraction * len(pairs))))
    # The stem as it pairs (NFC): a copy of the folder with its names stored decomposed holds out the same val.
    by_hash = sorted(pairs, key=lambda p: hashlib.sha256(_stem(p[0]).encode()).hexdigest())
    val_stems = {_stem(p[0]) for p in by_hash[:n_val]}
    train = [p for p in pairs if _stem(p[0]) not in val_stems]
    val = [p for p in pairs if _stem(p[0]) in val_stems]
    return train, val


def find_splits(root: Path, val_fraction: float) -> dict[str, Pairs]:
    """Split name -> (image, mask) pairs for either layout; see module docstring."""
    if not root.is_dir():
        raise DataError(f"data.path={root} does not exist or is not a folder")
    split_dirs = [s for s in SPLITS if (root / s).is_dir()]
    pool = [d for d in ("images", "masks") if (root / d).is_dir()]
    if pool and split_dirs:  # either layout would leave the other's files unread
        raise DataError(
            f"data.path={root} holds both {' and '.join(d + '/' for d in pool)} (one pool, val held out of it) "
            f"and split folders {', '.join(d + '/' for d in split_dirs)}: use one layout (images/ and masks/ "
            "inside train/, val/, test/; or only images/ and masks/)"
        )
    if pool or not split_dirs:
        if not pool:
            found = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
            raise DataError(f"data.path={root}: expected {_LAYOUT}; found: {_shown(found) or '(empty)'}")
        splits = {"train": pair_files(root)}
    else:
        if "train" not in split_dirs:
            raise DataError(f"data.path={root}: split folders {split_dirs} but no train/")
        splits = {s: pair_files(root / s) for s in split_dirs}
    if "val" not in splits:
        train, val = hold_out(splits["train"], val_fraction)
        splits["train"] = train
        if val:
            splits["val"] = val
    return {s: splits[s] for s in SPLITS if s in splits}


def _class_names(data_config) -> tuple[str, ...]:
    names = tuple(str(n) for n in (data_config.class_names or ()))
    if len(names) < 2:
        raise DataError(
            f"data.class_names={names!r}: the folder source needs one name per class "
            "(at least 2), in class-id order, e.g. "
            '--config.data.class_names=\'("background", "object")\''
        )
    return names


def folder_source(data_config) -> Source:
    """The folder source for a `config.data` ConfigDict (path, class_names, ...)."""
    class_names = _class_names(data_config)
    if not data_config.path:
        raise DataError(f"data.path is empty: set --config.data.path=DIR to a folder holding {_LAYOUT}")
    root = Path(data_config.path).expanduser()
    ignore = int(data_config.ignore_label)
    value_map = label_values.normalize_value_map(data_config.value_map)
    color_map = label_values.normalize_color_map(data_config.color_map, len(class_names))
    label_values.check_labels_config(len(class_names), ignore, value_map, color_map)
    splits = find_splits(root, float(data_config.val_fraction))

    examples, load = pair_loaders(
        data_config,
        splits.__getitem__,
        "folder",
        num_classes=len(class_names),
        ignore_label=ignore,
        value_map=value_map,
        color_map=color_map,
    )
    palette = default_palette(len(class_names)) if color_map is None else color_map[: len(class_names)]
    return Source(
        name=f"folder {root}",
        class_names=class_names,
        splits=tuple(splits),
        examples_fn=examples,
        load_fn=load,
        palette=palette.astype("uint8"),
        ignore_label=ignore,
    )


def pair_loaders(data_config, pairs_of: Callable[[str], list], name: str, **labels):
    """A file-pair source's `examples_fn` and `load_fn`: `pair_examples` of a split's `pairs_of(split)`
    with `labels` (num_classes, ignore_label, value_map, color_map) and `config.data`'s max_size and
    cache_decoded, and `decode_all` of those with its decode_workers and skip_bad (progress: "NAME SPLIT")."""

    def examples(split: str) -> Examples:
        return pair_examples(
            pairs_of(split),
            **labels,
            max_size=int(data_config.max_size),
            cache=bool(data_config.cache_decoded),
        )

    def load(split: str) -> Split:
        return decode_all(
            examples(split),
            workers=int(data_config.decode_workers),
            skip_bad=bool(data_config.skip_bad),
            desc=f"{name} {split}",
        )

    return examples, load


def pair_examples(
    pairs: Iterable[tuple[PathLike, PathLike]],
    *,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    value_map: Mapping | None = None,
    color_map: Sequence | np.ndarray | None = None,
    max_size: int = 0,
    cache: bool = False,
) -> Examples:
    """(image, mask) file pairs as lazy Examples, named by the image file stems.

    cache: give them a key (`Examples.key_fn`), so that `decode_all` keeps the
    decoded split on disk for the next run (fcn/data/cache.py).
    """
    pairs = [(Path(i), Path(m)) for i, m in pairs]
    value_map = label_values.normalize_value_map(value_map)
    color_map = label_values.normalize_color_map(color_map, num_classes)
    label_values.check_labels_config(num_classes, ignore_label, value_map, color_map)
    kwargs = {
        "num_classes": num_classes,
        "ignore_label": ignore_label,
        "value_map": value_map,
        "color_map": color_map,
        "max_size": max_size,
    }

    def key() -> str:
        from fcn.data import base, cache

        color = kwargs["color_map"]
        settings = {
            **kwargs,
            "color_map": None if color is None else color.tolist(),
            # The JPEG and PNG decoders are PIL's (libjpeg's version moves pixels).
            "versions": (Image.__version__, np.__version__),
        }
        return cache.files_key(pairs, settings, code=(__file__, images.__file__, label_values.__file__, base.__file__))

    return Examples(
        names=[image.stem for image, _ in pairs],
        read_fn=lambda n: images.read_pair(*pairs[n], **kwargs),
        size_fn=lambda n: images.pair_size(*pairs[n], max_size=max_size),
        unit="pairs",
        key_fn=key if cache else None,
    )
