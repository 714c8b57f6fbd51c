"""What training survives: SIGKILL at any moment, Ctrl-C and pre-emption, a disk that refuses
checkpoints, a workdir of another model, a NaN loss. docs/reliability.md sums them up.

Every run here uses configs/tiny.py unchanged (6 steps, a checkpoint and an evaluation every 3), so
all of them share one XLA compilation through the cache. The moments to interrupt are made exact
by HOOKS, which hold the training process there until the test has acted.
"""

import concurrent.futures.thread
import errno
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity  # private, but the one place a commit can be held or failed

from configs import tiny
from fcn import checkpoint, state as state_lib
from fcn.cli import run_training
from fcn.train import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds any one wait may take before the test fails (and kills what it started)

# `python -c HOOKS ARGS` is train.py, except that it holds, writing $FCN_TEST_MARKER and waiting for
# $FCN_TEST_MARKER.go: before the batch of step $FCN_TEST_HOLD_STEP + 1 (step N logged, N + 1 not
# begun), or with checkpoint $FCN_TEST_HOLD_COMMIT fully written but not yet renamed into place.
# SIGINT gets Python's handler first: a background job of a non-interactive shell (`pytest ... &`)
# inherits it ignored, and a run keeps it so.
HOOKS = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, whoever started pytest
from pathlib import Path
from orbax.checkpoint._src.path import atomicity
from fcn.data import pipeline

def hold(what):
    marker = Path(os.environ["FCN_TEST_MARKER"])
    marker.with_suffix(".writing").write_text(what)
    marker.with_suffix(".writing").rename(marker)  # the test sees the marker only with its text
    deadline = time.monotonic() + 120
    while not marker.with_suffix(".go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)

batch_indices = pipeline.batch_indices
def held_batch_indices(step, *args):
    if step == int(os.environ.get("FCN_TEST_HOLD_STEP", -1)):
        hold(f"step {step}")
    return batch_indices(step, *args)
pipeline.batch_indices = held_batch_indices

finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def held_finalize(self):
    final = self.get_final()
    if final.parent.name == "checkpoints" and final.name == os.environ.get("FCN_TEST_HOLD_COMMIT"):
        hold(f"commit {self.get()}")
    return await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = held_finalize

sys.argv[0] = "train.py"
from fcn.cli import train_main
train_main()
"""


@pytest.fixture(scope="module")
def env():
    """Environment of the training processes: the session's compile cache (conftest.py) and the CPU. (torch,
    installed for the benchmarks, is kept out of tensorboardX's import by fcn.train itself.)"""
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


class Training:
    """`python train.py --config configs/tiny.py --workdir W` with HOOKS, output to files."""

    def __init__(self, workdir: Path, env: dict, name: str, **hold):
        self.log = workdir.parent / name
        self.marker = workdir.parent / f"{name}.held"
        env = {**env, "FCN_TEST_MARKER": str(self.marker), **{f"FCN_TEST_{k.upper()}": str(v) for k, v in hold.items()}}
        args = [sys.executable, "-c", HOOKS, "--config", "configs/tiny.py", "--workdir", str(workdir)]
        out, err = open(f"{self.log}.out", "w"), open(f"{self.log}.err", "w")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)

    def wait_held(self) -> str:
        """Wait until the process holds at its hook; returns what it holds at."""
        deadline = time.monotonic() + TIMEOUT
        while not self.marker.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"exit code {self.proc.wait()} before the hold:\n{self.stderr()[-3000:]}")
            time.sleep(0.02)
        return self.marker.read_text()

    def release(self) -> None:
        self.marker.with_suffix(".go").touch()

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            self.proc.kill()  # nothing if already ended

    def stdout(self) -> str:
        return Path(f"{self.log}.out").read_text()

    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text()


def logged(workdir: Path, key: str = "loss") -> list[int]:
    """Steps of the metrics.jsonl lines holding `key`."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln)["step"] for ln in lines if f'"{key}"' in ln]


def steps_on_disk(workdir: Path, folder: str = "checkpoints") -> list[int]:
    """Complete checkpoints: orbax gives a checkpoint its step's name only once every file is written."""
    return sorted(int(p.name) for p in (workdir / folder).iterdir() if p.name.isdigit())


def assert_all_restore(workdir: Path) -> None:
    """Every checkpoint, latest and best, restores with its own step and finite parameters."""
    _, abstract, _ = state_lib.abstract_state(checkpoint.load_config(workdir), 4)
    ckpts = checkpoint.Checkpoints(workdir)
    try:
        for which, manager in (("latest", ckpts.latest), ("best", ckpts.best)):
            for step in manager.all_steps():
                state = ckpts.restore(abstract, which=which, step=step)
                assert int(state["step"]) == step, (which, step)
                assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    finally:
        ckpts.close()


def busy_threads() -> list[threading.Thread]:
    """Non-daemon threads still running (idle executor workers quit at exit, so they do not count)."""
    time.sleep(0.5)
    return [
        t
        for t in threading.enumerate()
        if t.is_alive()
        and not t.daemon
        and t is not threading.main_thread()
        and getattr(t, "_target", None) is not concurrent.futures.thread._worker
    ]


@pytest.fixture(scope="module")
def trained_to_3(tmp_path_factory):
    """A tiny run stopped at its first checkpoint (step 3 of 6)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train_and_evaluate(tiny.get_config(), workdir, stop_after=3)
    return workdir


@pytest.fixture
def workdir3(trained_to_3, tmp_path):
    return Path(shutil.copytree(trained_to_3, tmp_path / "run"))


def test_sigkill_between_checkpoints_and_during_a_commit_then_resume(tmp_path, env):
    """SIGKILL after step 4 (checkpoint 3 done), then SIGKILL with checkpoint 6 written but not yet
    renamed into place: each re-run of the same command resumes from checkpoint 3, and the finished
    run has every step logged exactly once, no temporary folder left, and every checkpoint restoring."""
    workdir = tmp_path / "run"
    first = Training(workdir, env, "first", hold_step=4)
    first.wait_held()
    first.proc.kill()
    first.wait()
    assert steps_on_disk(workdir) == [3] and logged(workdir) == [1, 2, 3, 4]

    second = Training(workdir, env, "second", hold_commit=6)
    assert second.wait_held().startswith("commit ")
    assert (workdir / "checkpoints" / "6.orbax-checkpoint-tmp" / "default").is_dir()  # all of 6 but its name
    second.proc.kill()
    second.wait()
    assert steps_on_disk(workdir) == [3] and logged(workdir) == [1, 2, 3, 4, 5, 6]

    third = Training(workdir, env, "third")
    assert third.wait() == 0, third.stderr()[-3000:]
    assert f"resuming {workdir} from step 3" in third.stderr()
    assert logged(workdir) == [1, 2, 3, 4, 5, 6]  # the lines past checkpoint 3 were dropped, then redone once
    assert logged(workdir, "eval_mean_iou") == [3, 6]
    assert steps_on_disk(workdir) == [3, 6] and steps_on_disk(workdir, "best")
    assert not [p for p in workdir.rglob("*") if p.name.endswith(".tmp") or "orbax-checkpoint-tmp" in p.name]
    assert_all_restore(workdir)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_save_a_checkpoint_and_exit_0(tmp_path, env, sig):
    """Ctrl-C, or a cluster pre-empting the job, during step 2: a checkpoint at step 2 (not a
    checkpoint step), exit code 0, and a message naming the step and how to resume."""
    workdir = tmp_path / "run"
    run = Training(workdir, env, "run", hold_step=1)
    run.wait_held()
    run.proc.send_signal(sig)
    run.release()
    assert run.wait() == 0, run.stderr()[-3000:]
    message = f"{sig.name} received: saved a checkpoint at step 2 in {workdir}; run the same command again to resume."
    assert message in run.stdout()
    assert steps_on_disk(workdir) == [2] and logged(workdir) == [1, 2]
    assert_all_restore(workdir)


def test_a_sigint_ignored_from_the_start_stays_ignored_in_the_loop():
    """A run started with SIGINT ignored (a background job of a script: a Ctrl-C at the terminal is
    not for it) kept it so until the training loop, which then took a Ctrl-C as its stop; as Python
    and fcn.cli do, the loop now leaves it ignored. SIGTERM still stops it."""
    from fcn.train import _StopRequest

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert not stop.requested(1)
            signal.raise_signal(signal.SIGTERM)
            assert stop.requested(1) and stop.why() == "SIGTERM received"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("patched", "oserror"),
    [
        ("_create_tmp_directory", OSError(errno.EROFS, "Read-only file system")),  # its folder cannot be made
        ("AtomicRenameTemporaryPath.finalize", OSError(errno.ENOSPC, "No space left on device")),  # at commit
    ],
    ids=["read-only", "disk-full"],
)
def test_unwritable_checkpoint_is_one_error_line_and_older_ones_stay(workdir3, monkeypatch, capsys, patched, oserror):
    """Checkpoint 6 cannot be written (root ignores chmod, so the failure is raised inside orbax):
    exit code 1, one line naming the step and the reason, no thread left to hang the exit, and
    checkpoint 3 untouched."""
    owner, name = (atomicity.AtomicRenameTemporaryPath, "finalize") if "." in patched else (atomicity, patched)
    original = getattr(owner, name)

    async def failing(*args, **kwargs):
        if "/6.orbax-checkpoint-tmp" in str(args[0].get() if name == "finalize" else args[1]):
            raise oserror
        return await original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    assert run_training(tiny.get_config(), str(workdir3)) == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith(f"error: could not write a checkpoint at step 6 in {workdir3}: [Errno {oserror.errno}]")
    assert "Earlier checkpoints are untouched" in errors[0]
    assert not busy_threads(), "threads left that would hold the process open after the error"
    assert steps_on_disk(workdir3) == [3]
    assert_all_restore(workdir3)


@pytest.mark.parametrize("where", ["open", "write", "config.json"])
def test_a_full_disk_for_metrics_jsonl_is_one_error_line_and_checkpoints_stay(workdir3, monkeypatch, capsys, where):
    """metrics.jsonl cannot take a line at step 4 (its open fails; or its write does, naming no file, as
    on a real full disk: /dev/full), or config.json cannot be written: exit code 1 with one line naming
    the file and the reason, not a traceback; no temporary file left; checkpoint 3 untouched."""
    from fcn import metrics_log

    def full(path, *args, **kwargs):
        if Path(path).name == "metrics.jsonl":
            if where == "write":
                return open("/dev/full", *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open(path, *args, **kwargs)

    if where == "config.json":  # its temporary file's write fails, naming no file
        write_text = Path.write_text

        def to_dev_full(path, *args, **kwargs):
            if path.name.startswith(".config.json.") and path.name.endswith(".tmp"):
                path.unlink()
                path.symlink_to("/dev/full")
            return write_text(path, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", to_dev_full)
    else:
        monkeypatch.setattr(metrics_log, "open", full, raising=False)  # the module's name for the builtin
    assert run_training(tiny.get_config(), str(workdir3)) == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    name = "config.json" if where == "config.json" else "metrics.jsonl"
    assert errors[0] == (
        f"error: cannot write {workdir3 / name}: No space left on device. The checkpoints are "
        "untouched (the latest: step 3); free space or fix permissions and re-run to resume"
    )
    assert not list(workdir3.glob("*.tmp"))
    assert steps_on_disk(workdir3) == [3]
    assert_all_restore(workdir3)


def test_resuming_with_another_model_names_the_fields_and_changes_nothing(workdir3, capsys):
    """A workdir of another model or optimizer structure is refused before any restore, naming each
    field; a learning rate may change."""
    before = {p: p.read_bytes() for p in workdir3.rglob("*") if p.is_file()}
    config = tiny.get_config()
    config.model.features, config.model.head, config.optimizer.learning_rate = 8, "mlp", 0.5
    config.optimizer.name, config.optimizer.grad_clip, config.optimizer.ema_decay = "sgd", 0.0, 0.99
    assert run_training(config, str(workdir3)) == 1
    err = capsys.readouterr().err
    assert "holds checkpoints of a different model or optimizer" in err and "Traceback" not in err
    assert "model.features: workdir has 4, config has 8" in err and "model.head: workdir has 'linear'" in err
    assert "optimizer.name: workdir has 'adamw', config has 'sgd'" in err
    assert "optimizer.grad_clip: workdir has 1.0, config has 0.0 (turning it off" in err
    assert "optimizer.ema_decay: workdir has 0.0, config has 0.99 (turning it on" in err
    assert "learning_rate" not in err
    assert {p: p.read_bytes() for p in workdir3.rglob("*") if p.is_file()} == before


def test_resuming_with_other_training_settings_warns_naming_each_change(workdir3, caplog):
    """A learning rate or num_steps may change on resume, but the run then no longer equals an unbroken
    one: a warning names each changed field with both values, and what it alters; none when unchanged."""
    config = tiny.get_config()
    config.optimizer.learning_rate, config.num_steps = 0.01, 8
    with caplog.at_level("WARNING", logger="fcn"):
        train_and_evaluate(config, workdir3, stop_after=1)
    warned = [r.getMessage() for r in caplog.records if "differs from the one" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    lines = warned[0].splitlines()[1:]
    assert [ln.strip() for ln in lines] == [
        "num_steps: 6 -> 8 (changes the learning-rate schedule)",
        "optimizer.learning_rate: 0.001 -> 0.01",
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="fcn"):
        train_and_evaluate(config, workdir3, stop_after=1)
    assert "differs from the one" not in caplog.text


def test_resuming_past_num_steps_is_refused_and_changes_nothing(workdir3, capsys):
    """A workdir whose latest checkpoint is past config.num_steps has nothing to train: said, not a
    silent exit 0 that rewrote config.json with the smaller num_steps."""
    before = {p: p.read_bytes() for p in workdir3.rglob("*") if p.is_file()}
    config = tiny.get_config()
    config.num_steps = 2
    assert run_training(config, str(workdir3)) == 1
    err = capsys.readouterr().err
    assert "error: config.num_steps=2 is below step 3, the latest checkpoint's" in err and "Traceback" not in err
    assert "--config.num_steps=4 or more" in err
    assert {p: p.read_bytes() for p in workdir3.rglob("*") if p.is_file()} == before


def test_a_checkpoint_that_does_not_fit_is_a_checkpoint_error(trained_to_3, monkeypatch):
    """Past that check (evaluate, predict, export restore too), a state of another shape is named, not
    an orbax traceback, and refused from the checkpoint's metadata before any array is read (a restore
    stopped midway left orbax's other reads pending, reported later as unraisable exceptions)."""
    config = tiny.get_config()
    config.model.features = 8
    _, abstract, _ = state_lib.abstract_state(config, 4)
    ckpts = checkpoint.Checkpoints(trained_to_3)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    try:
        with pytest.raises(
            checkpoint.CheckpointError,
            match=r"checkpoint 3 in .*checkpoints does not fit this config: params\.\S+ is \(.*\) there, \(.*\) here "
            r"\(and \d+ more differences\)",
        ):
            ckpts.restore(abstract)
        gc.collect()
    finally:
        ckpts.close()
    assert not unraisable
