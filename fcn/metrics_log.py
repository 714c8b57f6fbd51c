"""metrics.jsonl, and TensorBoard events where tensorboardX is installed: what a training run logs.

One JSON line per logged step and per evaluation, written by process 0. On resume the lines past
the checkpoint resumed from are dropped first, so no step appears twice; TensorBoard is told to
hide those steps' events too (tensorboardX's purge_step), all of them where a run is started again
before its first checkpoint. TensorBoard's tags are `train/loss`,
`eval/mean_iou` (metrics.jsonl's `eval_mean_iou`), ...
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import jax

from fcn.staging import write_atomic

log = logging.getLogger("fcn")


class MetricsLog:
    """metrics.jsonl (and TensorBoard events where tensorboardX is installed), process 0 only."""

    def __init__(self, workdir: Path, resume_step: int):
        self.path = workdir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self.writer = None
        if not self.enabled:
            return
        # After a crash the file may hold lines past the checkpoint we resume
        # from; drop them so no step appears twice.
        if self.path.exists():
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if _line_step(ln) is not None and _line_step(ln) <= resume_step
            ]
            write_atomic(self.path, "".join(ln + "\n" for ln in kept))
        try:
            # Resumed: TensorBoard hides the steps past the checkpoint that a stopped run had logged
            # (its events file stays), as metrics.jsonl drops their lines; also where a run died before
            # its first checkpoint (resume_step 0). The file's name has the start's second; a suffix
            # keeps a run resumed within it from overwriting the first's.
            earlier = any((workdir / "tensorboard").glob("events.out.tfevents.*"))
            purge = resume_step + 1 if resume_step or earlier else None
            suffix = f".{time.time_ns() % 10**9:09d}.{os.getpid()}"  # the second's nanoseconds: in order
            self.writer = _summary_writer_class()(
                str(workdir / "tensorboard"), purge_step=purge, filename_suffix=suffix
            )
        except ImportError:
            log.info("tensorboardX not installed: no TensorBoard events, metrics.jsonl only")

    def write(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        # None (a metric no pixel defined: all of them ignore_label) is null, not left out: evaluated_at
        # looks for eval_mean_iou, and without it the same step was evaluated again at every re-run
        line = {"step": step, **{k: v for k, v in values.items() if v is None or isinstance(v, int | float | str)}}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:  # a full disk fails the write or the close, naming no file: train.py needs it named
            e.filename = e.filename or str(self.path)
            raise
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{prefix}/{k.removeprefix(prefix + '_')}", v, step)  # eval/mean_iou
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch whenever it is installed, only to accept torch
    tensors: 2 s and more of a 2-core machine's start-up, for scalars that need
    none of it. torch is hidden during the import unless it is loaded already.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide and "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return SummaryWriter


def evaluated_at(workdir: Path, step: int) -> bool:
    """Whether the workdir's metrics.jsonl records an evaluation (an eval_mean_iou, null included) at `step`."""
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return False
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step") == step and "eval_mean_iou" in row:
            return True
    return False


def _line_step(line: str):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
