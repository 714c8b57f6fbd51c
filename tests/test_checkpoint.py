"""fcn.checkpoint.Checkpoints' choice of what best/ keeps, on a small state; and the writer of whole files."""

import errno
import os
import stat

import numpy as np
import pytest

from fcn import checkpoint


def test_best_writes_only_states_it_keeps_and_a_tie_goes_to_the_later_step(tmp_path):
    """Evaluations 0.5, 0.3, 0.5, 0.6, 0.1: best/ is written at steps 1, 3 (a tie: the later step,
    as orbax ranks them) and 4 only; the worse states are never written (they used to be written
    in full and then deleted). A new Checkpoints on the same workdir (a resumed run) compares with
    the best on disk. Every save is in latest/ as before."""
    state = {"step": np.int32(0), "params": np.arange(6, dtype=np.float32)}
    written = []

    def spy(ckpts):
        save = ckpts.best.save
        ckpts.best.save = lambda step, *a, **k: (written.append(step), save(step, *a, **k))[1]
        return ckpts

    ckpts = spy(checkpoint.Checkpoints(tmp_path, keep=10))
    for step, iou in enumerate((0.5, 0.3, 0.5, 0.6, 0.1), start=1):
        ckpts.save(step, state, mean_iou=iou)
    assert written == [1, 3, 4] and ckpts.best.all_steps() == [4]
    ckpts.close()

    resumed = spy(checkpoint.Checkpoints(tmp_path, keep=10))
    resumed.save(6, state, mean_iou=0.55)
    resumed.save(7, state, mean_iou=0.65)
    assert written == [1, 3, 4, 7] and resumed.best.all_steps() == [7]
    assert resumed.latest.all_steps() == list(range(1, 8))
    resumed.close()


def test_a_new_best_is_in_place_before_the_latest_at_its_step(tmp_path, monkeypatch):
    """A run killed once checkpoints/N was in place but not best/N resumed from N, and best/ never got
    that step's state, though it scored best. best/N is now renamed into place before checkpoints/N
    begins its rename (best/'s is slowed here, which the old order let the latest's overtake)."""
    import time

    from orbax.checkpoint._src.path import atomicity

    events = []
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def recorded(self):
        final = self.get_final()
        if final.parent.name == "best":
            time.sleep(0.3)
            await finalize(self)
            events.append(f"best/{final.name} in place")
        else:
            if final.parent.name == "checkpoints":  # (not an item's folder inside a step's)
                events.append(f"checkpoints/{final.name} begins")
            await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", recorded)
    state = {"step": np.int32(0), "params": np.arange(6, dtype=np.float32)}
    ckpts = checkpoint.Checkpoints(tmp_path, keep=2)
    ckpts.save(1, state, mean_iou=0.5)
    ckpts.save(2, state)  # no evaluation
    ckpts.save(3, state, mean_iou=0.4)  # not the best
    ckpts.close()
    assert events == [
        "best/1 in place",
        "checkpoints/1 begins",
        "checkpoints/2 begins",
        "checkpoints/3 begins",
    ]


def test_a_step_not_on_disk_is_named_with_the_steps_there(tmp_path):
    """`fcn.load("W/checkpoints/5")` once step 5 was deleted (keep_checkpoints), or a step never saved:
    the error said its files were "incomplete or corrupt (a partial copy?)"; it names the steps held."""
    state = {"step": np.int32(0), "params": np.arange(6, dtype=np.float32)}
    ckpts = checkpoint.Checkpoints(tmp_path, keep=2)
    for step in (3, 6, 9):
        ckpts.save(step, state, mean_iou=0.1 * step)
    ckpts.close()
    reader = checkpoint.Checkpoints(tmp_path)
    with pytest.raises(checkpoint.CheckpointError) as e:
        reader.restore(state, step=3)
    assert str(e.value).startswith(f"no checkpoint 3 in {tmp_path / 'checkpoints'}: it holds steps 6, 9 (the latest ")
    with pytest.raises(
        checkpoint.CheckpointError, match=rf"^no checkpoint 6 in {tmp_path / 'best'}: it holds step 9 \(it keeps "
    ):
        reader.restore(state, which="best", step=6)
    assert int(reader.restore(state, step=6)["step"]) == 0  # the steps it holds still restore
    reader.close()


def test_write_atomic_writes_whole_files_with_the_umask_mode_and_leaves_nothing_on_failure(tmp_path):
    """fcn.staging.write_atomic, the one writer of whole files (workdir JSON, metrics.jsonl, pictures, PNGs,
    cache entries): the file gets the mode a plain write would (mkstemp's 0600 would hide predictions from
    other users), and a failed write leaves the old file and no temporary one, its error naming the file."""
    from fcn.staging import write_atomic

    path = tmp_path / "config.json"
    write_atomic(path, "old")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "old" and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    def fails(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        write_atomic(path, fails)
    assert e.value.filename == str(path) and path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    write_atomic(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["config.json"]
