"""The contract every data source fulfils: decoded uint8 examples, class names, splits.

A split comes in two forms: `Examples`, the lazy one (names, and a function that
reads and decodes example i, with its size from image headers), and `Split`,
every example decoded and held in memory. Every source provides the lazy form;
`Source.load` decodes it in parallel threads (`decode_all`), so the two forms
hold the same pixels by construction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

IGNORE_LABEL = 255
_PROGRESS_MIN_EXAMPLES = 100  # below this a progress bar is noise

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Data, or a `config.data` field describing it, cannot be used.

    The message names the file (or the config key) and what would work. The
    command line prints it instead of a traceback.
    """


@dataclasses.dataclass(frozen=True)
class Split:
    """Decoded examples of one split, held in memory.

    images: uint8 arrays [H, W, 3]; labels: uint8 arrays [H, W] whose values are
    class ids in [0, num_classes) or the source's ignore label. names: one id per
    example (a file stem), used in error messages and reports. key: what the
    pixels depend on, as kept in fcn's cache folder (`decode_all`), or None; what
    is derived from the split (the training canvas) is cached under it too.
    """

    images: Sequence[np.ndarray]
    labels: Sequence[np.ndarray]
    names: Sequence[str]
    key: str | None = None

    def __len__(self) -> int:
        return len(self.images)


@dataclasses.dataclass(frozen=True)
class Examples:
    """The examples of one split, read and decoded only when asked.

    read_fn(i): example i as a Split holds it, (image uint8 [H, W, 3], label
    uint8 [H, W]), after every check and `data.max_size`; a bad example raises
    DataError naming its file. size_fn(i): its (H, W), cheaply (image headers)
    where the source can. Both are called from several threads at once.
    """

    names: Sequence[str]
    read_fn: Callable[[int], tuple[np.ndarray, np.ndarray]]
    size_fn: Callable[[int], tuple[int, int]]
    unit: str = "examples"  # what one example is called in messages ("pairs" for image/mask files)
    # What the decoded split depends on, as a string (fcn.data.cache.files_key), for `decode_all` to
    # keep it decoded on disk; None: decoded afresh every time.
    key_fn: Callable[[], str] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read_fn(i)

    def size(self, i: int) -> tuple[int, int]:
        return self.size_fn(i)

    def subset(self, ids: Sequence[int]) -> Examples:
        """These examples' `ids`, in that order, numbered from 0; not kept decoded on disk (no key_fn)."""
        ids = list(ids)
        return dataclasses.replace(
            self,
            names=[self.names[i] for i in ids],
            read_fn=lambda j: self.read(ids[j]),
            size_fn=lambda j: self.size(ids[j]),
            key_fn=None,
        )


def map_examples(fn, examples: Examples, *, workers: int = 8, skip_bad: bool = False, desc: str = "decoding"):
    """[(i, fn(i))] for every example, computed in parallel threads, in order.

    A DataError from fn raises, or with skip_bad=True is logged and the example
    left out; the count left out is logged at the end, and an error raised when
    nothing is left. A progress bar from 100 examples up (fcn.progress).
    """
    from fcn.progress import progress_bar  # tqdm only needed here; keeps `import fcn.data` light

    done, n = [], len(examples)
    disable = n < _PROGRESS_MIN_EXAMPLES
    # PIL and numpy release the GIL while decoding, so threads give real speed-up.
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(fn, i) for i in range(n)]
        for i, future in progress_bar(iterable=enumerate(futures), total=n, desc=desc, disable=disable):
            try:
                done.append((i, future.result()))
            except DataError as e:
                if not skip_bad:
                    raise
                logger.warning("skipping bad %s: %s", examples.unit.rstrip("s"), e)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if len(done) < n:
        logger.warning("%s: skipped %d of %d %s (data.skip_bad=True)", desc, n - len(done), n, examples.unit)
    if n and not done:
        raise DataError(f"{desc}: all {n} {examples.unit} were unreadable")
    return done


def decode_all(examples: Examples, *, workers: int = 8, skip_bad: bool = False, desc: str = "decoding") -> Split:
    """Decodes every example in parallel threads into a Split, in order (bad ones: `map_examples`).

    With `examples.key_fn`, the split decoded by an earlier run is read back
    instead while nothing it depends on has changed (fcn/data/cache.py).
    """
    key = None
    if examples.key_fn is not None:
        from fcn.data import cache

        try:
            key = hashlib.sha256(f"{examples.key_fn()}\0skip_bad={bool(skip_bad)}".encode()).hexdigest()[:32]
        except OSError:  # a file gone since it was listed: decoding names it (DataError)
            key = None
        split = cache.load(key, desc) if key else None
        if split is not None:
            return split
    done = map_examples(examples.read, examples, workers=workers, skip_bad=skip_bad, desc=desc)
    split = Split(
        images=[image for _, (image, _) in done],
        labels=[label for _, (_, label) in done],
        names=[examples.names[i] for i, _ in done],
    )
    if key is not None and len(split) == len(examples):  # a split with bad files skipped is not kept:
        cache.save(key, split, desc)  # each run then says again what it skipped
        return dataclasses.replace(split, key=key)
    return split


@dataclasses.dataclass(frozen=True)
class Source:
    """A segmentation dataset: what it is called, its classes, and how to read a split.

    examples_fn(split) gives the lazy form of a split; load_fn(split) the
    decoded one (sources build it with `decode_all` over examples_fn).
    """

    name: str
    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    examples_fn: Callable[[str], Examples]
    load_fn: Callable[[str], Split]
    palette: np.ndarray  # uint8 [num_classes, 3], colours for pictures
    ignore_label: int = IGNORE_LABEL
    # The folder the data was found in through the environment ($FCN_CAMVID_DIR) while
    # config.data.path was empty: train.py records it as data.path in the workdir's config.json,
    # so that evaluating the workdir later finds the data in a shell without the variable.
    found_at: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(
                f"{self.name}: split {split!r} is not available; available splits: {', '.join(self.splits) or '(none)'}"
            )

    def examples(self, split: str) -> Examples:
        """The split's examples, nothing decoded yet (for streaming)."""
        self._check_split(split)
        return self.examples_fn(split)

    def load(self, split: str) -> Split:
        """The split's examples, all decoded and held in memory."""
        self._check_split(split)
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
