"""Checkpoints and workdir metadata, through orbax.

A workdir holds:
  config.json       the full config of the run (JSON, never pickled)
  dataset.json      class names, palette and ignore label, for prediction without the data
  checkpoints/N/    the latest `keep_checkpoints` training states
  best/N/           the state with the best eval mean IoU so far
  metrics.jsonl     one JSON line per logged step and per evaluation
  tensorboard/      the same as TensorBoard events, where tensorboardX is installed (fcn.metrics_log)
  eval_{split}*     fcn.evaluate's report and pictures

orbax writes each checkpoint into a temporary folder and renames it only once
complete, so a process killed mid-write leaves the previous checkpoints intact
and no half-written one is ever restored.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from fcn import saved_config
from fcn.staging import lock_folder, this_process, write_atomic


class _Orbax:
    """orbax.checkpoint, imported at its first use: a training run in a fresh workdir then starts its
    first step without waiting for that import (0.2-0.3 s on a 2-core Xeon) and makes it at its first save."""

    def __getattr__(self, name: str):
        import orbax.checkpoint

        return getattr(orbax.checkpoint, name)


ocp = _Orbax()

# Config fields whose change makes an old checkpoint unusable.
MODEL_FIELDS = (
    "model.features",
    "model.depth",
    "model.norm",
    "model.upsample",
    "model.head",
    "model.bottleneck",
    "model.input_scale",
)
# Optimizer fields that change the structure of the saved optimizer state (the rest may change on resume);
# for the switches only on (> 0) against off counts.
OPTIMIZER_FIELDS = ("optimizer.name",)
OPTIMIZER_SWITCHES = ("optimizer.grad_clip", "optimizer.ema_decay")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or restored; the message says why."""


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else None
    return config


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file and rename it over `path`."""
    write_atomic(path, json.dumps(obj, indent=2, default=_jsonable))


def _jsonable(x):
    if isinstance(x, np.ndarray | np.generic):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a workdir was trained with."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a workdir written by `python train.py`?")
    return ml_collections.ConfigDict(saved_config.read(path))


def read_json(path: Path) -> dict:
    """A workdir's JSON object; one cut short, mistyped or not an object is a CheckpointError naming it."""
    try:
        out = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): fix it, or restore it from a copy") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path} holds a JSON {type(out).__name__}, not an object: restore it from a copy")
    return out


def check_compatible(workdir: Path, config, num_classes: int) -> None:
    """Refuse to resume a workdir written by a different model, naming the fields."""
    path = workdir / "config.json"
    if not path.exists() or not (workdir / "checkpoints").exists():
        return
    old, new = saved_config.read(path), json.loads(config.to_json())
    diffs = [
        f"{f}: workdir has {_get(old, f)!r}, config has {_get(new, f)!r}"
        for f in (*MODEL_FIELDS, *OPTIMIZER_FIELDS)
        if _get(old, f) != _get(new, f)
    ]
    for f in OPTIMIZER_SWITCHES:
        was, now = (_get(old, f) or 0) > 0, (_get(new, f) or 0) > 0
        if was != now:
            diffs.append(
                f"{f}: workdir has {_get(old, f)!r}, config has {_get(new, f)!r} "
                f"(turning it {'off' if was else 'on'} changes the saved optimizer state)"
            )
    info = workdir / "dataset.json"
    if info.exists():
        old_k = len(read_json(info)["class_names"])
        if old_k != num_classes:
            diffs.append(f"number of classes: workdir has {old_k}, data has {num_classes}")
    if diffs:
        raise CheckpointError(
            f"{workdir} holds checkpoints of a different model or optimizer and cannot be resumed:\n  "
            + "\n  ".join(diffs)
            + "\nUse a new --workdir, or the same model and optimizer settings."
        )


# Fields whose change on resume makes the rest of the run differ from one trained with either config from the
# start, and how.
RESUME_EFFECTS = {
    "seed": "the data order, augmentation and dropout",
    "batch_size": "the data order",
    "num_steps": "the learning-rate schedule",
    "optimizer.warmup_steps": "the learning-rate schedule",
    "optimizer.schedule": "the learning-rate schedule",
}


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} for every leaf of a nested dict (an empty dict is a leaf)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(workdir: Path, saved: dict) -> list[str]:
    """Each field in which `saved` (a config as config.json would hold it) differs from the workdir's
    config.json, in words: "optimizer.learning_rate: 0.001 -> 0.01", and what the change alters where
    the resumed run can then not equal an unbroken one. [] without a config.json."""
    path = workdir / "config.json"
    if not path.exists():
        return []
    old, new = _leaves(saved_config.read(path)), _leaves(saved)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            effect = f" (changes {RESUME_EFFECTS[key]})" if key in RESUME_EFFECTS else ""
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}{effect}")
    return changes


def prepare_workdir(workdir: Path) -> None:
    """Create the workdir and its checkpoint folders, and check that they take files, before training."""
    for folder in (workdir, workdir / "checkpoints", workdir / "best"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise CheckpointError(
                f"cannot write to {folder}: {e.strerror or e}; use another --workdir or fix that folder"
            ) from e


TRAINER = ".fcn-trainer"  # in a workdir being trained: who trains it, for the refusal of a second run


def hold_for_training(workdir: Path) -> int | None:
    """Lock `workdir` (flock, `fcn.staging.lock_folder`) for one training run: a second run in it,
    from another terminal or a job started again while the first still runs, would write the same
    checkpoints and metrics.jsonl, so it is refused with a CheckpointError naming the first (its pid
    and host, from the TRAINER file written here). The lock goes with the process, SIGKILL included.
    Returns the descriptor holding it; None where the file system has no locks (nothing is checked)."""
    try:
        held = lock_folder(workdir)
    except BlockingIOError:
        try:
            who = (workdir / TRAINER).read_text().strip() or "another process"
        except OSError:
            who = "another process"
        raise CheckpointError(
            f"{workdir} is being trained by {who}; two runs in one workdir would overwrite each other's "
            "checkpoints. Wait for that run to end (or stop it: it saves and exits), or use another --workdir"
        ) from None
    if held is not None:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        write_atomic(workdir / TRAINER, f"{this_process()} (since {since})\n")
    return held


def _manager(directory: Path, **options) -> ocp.CheckpointManager:
    """An orbax manager of `directory`, all of whose barriers between processes carry its folder's name."""
    return ocp.CheckpointManager(
        directory.absolute(),
        item_handlers=ocp.StandardCheckpointHandler(),  # so that a fresh manager reads a step's metadata too
        options=ocp.CheckpointManagerOptions(
            create=True,
            # Directories made in save() itself: made in orbax's background threads, a failure
            # (read-only or full disk) left threads waiting 20 minutes for them, hanging the exit.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            # Latest and best save the same step at once, each finishing in background threads that
            # meet the other processes' at jax.distributed barriers whose names, by default, do not
            # say which manager they serve ("async_write_complete.6", "...:set_value_start"). When
            # one process ran late, the other's two threads both reached a barrier first: one was
            # refused ("already ongoing") and the late process waited at a barrier no one else would
            # join, for orbax's 20 minutes. Named after the folder, the two never share a barrier.
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=directory.name),
            **options,
        ),
    )


def _misfit(manager: ocp.CheckpointManager, step: int, target) -> str:
    """How the arrays of checkpoint `step` differ from `target`'s in name or shape, in words ("" when
    they do not), from the checkpoint's metadata alone. Checked before restoring: orbax starts reading
    every array at once, and one that does not fit stopped the restore with the others' reads left
    pending, and named one array in its own terms."""
    try:
        saved_tree = manager.item_metadata(step).tree
    except Exception:  # noqa: BLE001 - no readable metadata: the restore itself will say what is wrong
        return ""
    is_array = lambda m: hasattr(m, "name") and hasattr(m, "shape")  # noqa: E731
    saved = {m.name: tuple(m.shape) for m in jax.tree.leaves(saved_tree, is_leaf=is_array) if is_array(m)}
    wanted = {k: tuple(t.shape) for k, t in ocp.tree.to_flat_dict(target, sep=".").items() if t is not None}
    if not wanted.keys() & saved.keys():  # names in another scheme (another orbax?): never refuse on that
        return ""
    order = lambda k: (not k.startswith("params."), k)  # noqa: E731 - the model's own arrays named first
    problems = [f"it has no {k}" for k in sorted(wanted.keys() - saved.keys(), key=order)]
    problems += [f"it has {k}, which this config does not" for k in sorted(saved.keys() - wanted.keys(), key=order)]
    problems += [
        f"{k} is {saved[k]} there, {wanted[k]} here"
        for k in sorted(wanted.keys() & saved.keys(), key=order)
        if saved[k] != wanted[k]
    ]
    if not problems:
        return ""
    return problems[0] + (f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else "")


def _root_cause(e: BaseException, limit: int = 300) -> str:
    """The first line of the innermost exception of a chain, without tensorstore's JSON spec: what
    went wrong, where orbax wraps it in errors that print pages of that spec."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).splitlines()
    text = (lines[0] if lines else type(e).__name__).split(" [tensorstore_spec")[0].rstrip(". ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpoints:
    """The latest few training states and the best one by eval mean IoU. With `training`, the
    workdir is this process's to write until `close` (`hold_for_training`)."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, *, training: bool = False):
        self.workdir = Path(workdir)
        self._keep = keep
        self._held = hold_for_training(self.workdir) if training and jax.process_index() == 0 else None

    # The managers are made at their first use: a fresh workdir's run needs neither before its first save.
    @functools.cached_property
    def latest(self) -> ocp.CheckpointManager:
        return _manager(self.workdir / "checkpoints", max_to_keep=self._keep)

    @functools.cached_property
    def best(self) -> ocp.CheckpointManager:
        return _manager(self.workdir / "best", max_to_keep=1, best_fn=lambda m: m["mean_iou"], best_mode="max")

    def _made(self) -> list:
        return [self.__dict__[name] for name in ("latest", "best") if name in self.__dict__]

    def _holds_steps(self, which: str) -> bool:
        """Whether the folder of `which` ("latest" or "best") holds anything: a missing or empty one
        holds no step, and is then left as it is (a manager would create it)."""
        if which in self.__dict__:
            return True
        folder = self.workdir / ("best" if which == "best" else "checkpoints")
        return folder.is_dir() and any(folder.iterdir())

    def latest_step(self) -> int | None:
        return self.latest.latest_step() if self._holds_steps("latest") else None

    def best_or_latest(self) -> str:
        """Which checkpoint to read for the best: "best" once one was saved, else "latest" (no evaluation yet)."""
        return "best" if self._holds_steps("best") and self.best.best_step() is not None else "latest"

    def save(self, step: int, state, *, mean_iou: float | None = None, latest: bool = True) -> None:
        """Save the state as latest (and as best when `mean_iou` equals or beats the best so far: a
        state that would not be kept is not written, then deleted). latest=False: as best alone, for a
        step that checkpoints/ holds already and that is evaluated only now."""
        try:
            if mean_iou is not None and np.isfinite(mean_iou) and self._is_best(step, float(mean_iou)):
                if step in self.best.all_steps():
                    # Left by a run killed between its best and latest saves; this run redid the step.
                    self.best.delete(step)
                metrics = {"mean_iou": float(mean_iou)}
                self.best.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
                # Best in place before latest: killed in between, the run resumes from the step before and
                # redoes this one (above). The other way round it resumed past this step, never saved as best.
                self.best.wait_until_finished()
            if latest:
                self.latest.save(step, args=ocp.args.StandardSave(state), force=True)
            self.wait()
        except (OSError, ValueError) as e:
            try:  # let orbax's background writes end before the error ends the process
                self.wait()
            except (OSError, ValueError):
                pass
            raise CheckpointError(
                f"could not write a checkpoint at step {step} in {self.workdir}: {e}. "
                "Earlier checkpoints are untouched; free space or fix permissions and re-run to resume."
            ) from e

    def _is_best(self, step: int, mean_iou: float) -> bool:
        """Whether best/ keeps this step's state: a tie goes to the later step, as orbax's own ranking
        (max_to_keep=1) would decide; a step best/ holds already was left by a killed run and is redone."""
        best = self.best.best_step()
        if best is None or best == step:
            return True
        return mean_iou >= float((self.best.metrics(best) or {}).get("mean_iou", -np.inf))

    def wait(self) -> None:
        for manager in self._made():
            manager.wait_until_finished()

    def restore(self, abstract, *, which: str = "latest", step: int | None = None, sharding=None):
        """Restore a state shaped like `abstract` (from `jax.eval_shape`).

        sharding: where to put every array (e.g. replicated over the mesh); with
        several processes it must be given, each process then reads its shards.
        By default, this process's first device, whatever the devices that wrote it.
        """
        if not self._holds_steps(which):  # reading makes no folder
            raise CheckpointError(
                f"no {which} checkpoint in {self.workdir}: its {'best' if which == 'best' else 'checkpoints'}/ "
                "folder is missing or empty (has the run saved a checkpoint yet?)"
            )
        manager = self.best if which == "best" else self.latest
        step = step if step is not None else (manager.best_step() if which == "best" else manager.latest_step())
        if step is None:
            raise CheckpointError(f"no {which} checkpoint in {self.workdir}")
        if step not in (held := manager.all_steps()):  # else "incomplete or corrupt", of files that are not there
            raise CheckpointError(
                f"no checkpoint {step} in {manager.directory}: it holds "
                + (f"step{'s' * (len(held) > 1)} {', '.join(map(str, sorted(held)))}" if held else "none")
                + (
                    " (it keeps the best one only)"
                    if which == "best"
                    else " (the latest config.keep_checkpoints are kept)"
                )
            )
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
        # Never the saved sharding: a checkpoint written by several processes must load in one.
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding), target)
        misfit = _misfit(manager, step, target)
        if misfit:
            raise CheckpointError(
                f"checkpoint {step} in {manager.directory} does not fit this config: {misfit}. "
                "Was it written with other model or optimizer settings?"
            )
        try:
            return manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # noqa: BLE001 - orbax raises plain Exception for an unreadable array
            from fcn.cli import out_of_memory

            if out_of_memory(e):  # not the files' fault: the caller says so
                raise
            raise CheckpointError(
                f"cannot read checkpoint {step} in {manager.directory}: {_root_cause(e)}. Its files are "
                "incomplete or corrupt (a partial copy?), or it was written with other model or optimizer "
                "settings; restore the folder from a copy, or use another checkpoint"
            ) from e

    def close(self) -> None:
        for manager in self._made():
            manager.close()
        if self._held is not None:
            (self.workdir / TRAINER).unlink(missing_ok=True)
            os.close(self._held)  # releases the lock
            self._held = None
