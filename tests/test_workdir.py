"""One training run per workdir: a second one, started while the first runs, is refused and changes
nothing; a workdir that cannot take files is found before any step. docs/reliability.md sums them up."""

import os
import socket

import pytest

from configs import tiny
from fcn import checkpoint
from fcn.cli import run_training
from tests.test_faults import Training, assert_all_restore, logged, steps_on_disk


@pytest.fixture(scope="module")
def env():
    return {**os.environ, "JAX_PLATFORMS": "cpu"}  # as tests/test_faults.py's training processes


def test_a_workdir_is_held_by_one_training_run_at_a_time(tmp_path):
    """Checkpoints for training holds the workdir until closed; a second holder is refused naming the
    first, and readers (fcn.evaluate, fcn.load) are not held back."""
    first = checkpoint.Checkpoints(tmp_path, training=True)
    trainer = (tmp_path / checkpoint.TRAINER).read_text()
    assert trainer.startswith(f"pid {os.getpid()} on {socket.gethostname()} (since ")
    with pytest.raises(checkpoint.CheckpointError, match=rf"{tmp_path} is being trained by pid {os.getpid()} on "):
        checkpoint.Checkpoints(tmp_path, training=True)
    checkpoint.Checkpoints(tmp_path).close()  # a reader
    first.close()
    assert not (tmp_path / checkpoint.TRAINER).exists()
    checkpoint.Checkpoints(tmp_path, training=True).close()  # free again


def test_a_second_run_in_a_workdir_being_trained_is_refused_and_the_first_goes_on(tmp_path, env, capsys):
    """The same command started twice (another terminal, a job requeued while the first still runs):
    both wrote checkpoints and metrics.jsonl into one workdir. The second now exits 1 naming the
    first, with the workdir's files as they were; the first finishes, every checkpoint restores."""
    workdir = tmp_path / "run"
    first = Training(workdir, env, "first", hold_step=1)  # held after step 1
    assert first.wait_held() == "step 1"
    files = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.is_file()}
    assert run_training(tiny.get_config(), str(workdir)) == 1
    err = capsys.readouterr().err
    assert f"error: {workdir} is being trained by pid {first.proc.pid} on " in err and "Traceback" not in err
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.is_file()} == files
    first.release()
    assert first.wait() == 0, first.stderr()
    assert steps_on_disk(workdir) == [3, 6] and logged(workdir) == [1, 2, 3, 4, 5, 6]
    assert not (workdir / checkpoint.TRAINER).exists()
    assert_all_restore(workdir)


@pytest.mark.parametrize("in_the_way", ["workdir", "checkpoints"])
def test_a_file_in_place_of_a_folder_fails_before_training(tmp_path, capsys, in_the_way):
    """A workdir (or its checkpoints folder) that cannot take files is found before any step is run."""
    workdir = tmp_path / "run"
    blocker = workdir if in_the_way == "workdir" else workdir / "checkpoints"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    assert run_training(tiny.get_config(), str(workdir)) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write to {blocker}:" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder" and not (workdir / "metrics.jsonl").exists()
