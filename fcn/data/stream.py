"""Training examples read from their source each step, for training sets that do not fit in memory.

`Stream` has the interface of an in-memory `pipeline.Canvas` (len, sizes_N2,
batch, labels, close) and the same data order: batch `step` holds the
examples `pipeline.batch_indices(step, ...)` names, decoded by a pool of
`data.decode_workers` threads, rescaled by `model.input_scale` and padded by
`pipeline.fill` into a canvas of the shape the in-memory one would have (the
largest example, from image headers). So a streamed run trains on exactly the
arrays an in-memory run does.

Batches are decoded `prefetch` steps ahead while the device runs the current
one; at most (prefetch + 1) x batch examples are held at a time.

Bad input: an unreadable file raises DataError naming it, when its batch
comes. With `data.skip_bad`, a file whose header cannot be read is left out
at the start (as in memory, so the order is still the in-memory one); a file
that only fails when decoded is logged once and its place in a batch goes to
the next readable example (the order then differs from an in-memory run,
which leaves it out before drawing the order).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from fcn.data import pipeline
from fcn.data.base import DataError, Examples, map_examples
from fcn.data.images import rescale_pair

logger = logging.getLogger(__name__)


def scan_sizes(examples: Examples, workers: int, skip_bad: bool, desc: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, sizes): the examples whose size can be read (all unless skip_bad), and their (H, W)."""
    found = map_examples(examples.size, examples, workers=workers, skip_bad=skip_bad, desc=f"{desc} (sizes)")
    return [i for i, _ in found], [tuple(int(v) for v in hw) for _, hw in found]


class Stream:
    """The training split, decoded per batch on the host (see the module docstring)."""

    def __init__(
        self,
        examples: Examples,
        ids: Sequence[int],
        sizes_N2: np.ndarray,
        *,
        ignore_label: int,
        scale: float = 1.0,
        workers: int = 8,
        prefetch: int = 4,
        skip_bad: bool = False,
        desc: str = "stream",
    ):
        """ids: the examples to train on; sizes_N2: their (H, W) after `scale` (`scan_sizes`)."""
        self.examples, self.ids = examples, list(ids)
        self.sizes_N2 = np.asarray(sizes_N2, np.int32).reshape(-1, 2)
        self.shape_hw = tuple(int(v) for v in self.sizes_N2.max(axis=0)) if len(self.ids) else (1, 1)
        self.ignore_label, self.scale, self.skip_bad, self.desc = ignore_label, scale, skip_bad, desc
        self.prefetch, self.workers = max(0, prefetch), max(1, workers)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fcn-stream")
        self._pending: dict[int, list[Future]] = {}
        self._plan = None
        self._bad: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    def _read(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Example at position n at the network's scale; with skip_bad, the next readable one."""
        for k in range(len(self)):
            m = (n + k) % len(self)
            if m in self._bad:
                continue
            try:
                image, label = self.examples.read(self.ids[m])
                image, label = rescale_pair(image, label, self.scale)
                if label.shape != tuple(self.sizes_N2[m]):  # its files changed since `scan_sizes` read them
                    (h, w), (sh, sw) = label.shape, self.sizes_N2[m]
                    raise DataError(
                        f"{self.examples.names[self.ids[m]]}: decoded at {h}x{w} (HxW), but it was {sh}x{sw} when "
                        "training began: its files changed since (the command run again reads them afresh)"
                    )
            except DataError as e:
                if not self.skip_bad:
                    raise
                with self._lock:
                    if m not in self._bad:
                        self._bad.add(m)
                        logger.warning(
                            "%s: skipping bad %s, its place goes to the next one: %s",
                            self.desc,
                            self.examples.unit.rstrip("s"),
                            e,
                        )
                continue
            return image, label
        raise DataError(f"{self.desc}: all {len(self)} {self.examples.unit} were unreadable")

    def batch(self, step: int, batch_size: int, seed: int, rows: slice = slice(None)):
        """This process's `rows` of global batch `step`: (images_BHWC, labels_BHW, sizes_B2).

        Steps step + 1 .. step + prefetch are submitted for decoding before
        this one is waited for.
        """
        plan = (batch_size, seed, rows)
        if plan != self._plan:
            self._cancel(list(self._pending))
            self._plan = plan
        self._cancel([s for s in self._pending if not step <= s <= step + self.prefetch])
        for s in range(step, step + self.prefetch + 1):
            if s not in self._pending:
                idx = pipeline.batch_indices(s, len(self), batch_size, seed)[rows]
                self._pending[s] = [self._pool.submit(self._read, int(n)) for n in idx]
        pairs = [f.result() for f in self._pending.pop(step)]
        canvas = pipeline.fill(pairs, self.shape_hw, self.ignore_label)
        return canvas.images_NHWC, canvas.labels_NHW, canvas.sizes_N2

    def labels(self) -> Iterator[np.ndarray]:
        """Every example's label before `input_scale`, read once in order (class frequencies)."""
        window: collections.deque[Future] = collections.deque()
        for n in range(len(self)):
            window.append(self._pool.submit(self._read_label, n))
            if len(window) > 2 * self.workers:
                label = window.popleft().result()
                if label is not None:
                    yield label
        for future in window:
            label = future.result()
            if label is not None:
                yield label

    def _read_label(self, n: int):
        try:
            return self.examples.read(self.ids[n])[1]
        except DataError:
            if not self.skip_bad:
                raise
            return None

    def _cancel(self, steps) -> None:
        for s in steps:
            for f in self._pending.pop(s):
                f.cancel()

    def close(self) -> None:
        """Stops the threads; decodes not begun are dropped."""
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
