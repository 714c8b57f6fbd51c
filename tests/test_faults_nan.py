"""What training does when its numbers go NaN: it stops, naming the step, and keeps the last good checkpoint
(docs/reliability.md, "Faults"; the other faults are tests/test_faults.py's, whose runs and helpers these share)."""

import jax
import numpy as np

from configs import tiny
from fcn import checkpoint
from fcn.cli import run_training
from tests.test_faults import assert_all_restore, logged, steps_on_disk, trained_to_3, workdir3  # noqa: F401


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(workdir3, monkeypatch, capsys):  # noqa: F811
    """Weights gone NaN after checkpoint 3 (as a diverging update leaves them; done to the restored
    state, so the compiled step is the same): the error names step 4, says checkpoint 3 is kept and
    what to try; no checkpoint of the NaN state is written."""
    restore = checkpoint.Checkpoints.restore

    def diverged(self, *args, **kwargs):
        state = restore(self, *args, **kwargs)
        return {**state, "params": jax.tree.map(lambda p: p * np.nan, state["params"])}

    monkeypatch.setattr(checkpoint.Checkpoints, "restore", diverged)
    assert run_training(tiny.get_config(), str(workdir3)) == 1
    err = capsys.readouterr().err
    assert "error: the training loss became nan at step 4. The last good checkpoint (step 3) is kept." in err
    assert "Try a lower learning rate (--config.optimizer.learning_rate=0.0001)." in err and "Traceback" not in err
    assert "grad_clip" not in err and "dtype" not in err  # no advice to do what the config already does
    assert steps_on_disk(workdir3) == [3] and logged(workdir3) == [1, 2, 3]
    monkeypatch.undo()
    assert_all_restore(workdir3)


def test_nan_gradients_at_a_save_step_are_not_saved_as_a_good_checkpoint(workdir3, monkeypatch, capsys, diverge_at):  # noqa: F811
    """A step whose loss is finite but whose gradients are NaN (its update turns the weights NaN) at
    the last step, a save step: stopped there, naming the gradient norm and the step; checkpoint 3
    stays the last, and no NaN state is saved as latest or best (it used to finish with exit 0)."""
    diverge_at(6, grad_norm=True)
    assert run_training(tiny.get_config(), str(workdir3)) == 1
    err = capsys.readouterr().err
    assert "error: the gradient norm became nan at step 6. The last good checkpoint (step 3) is kept." in err
    assert steps_on_disk(workdir3) == [3] and steps_on_disk(workdir3, "best") == [3]
    assert logged(workdir3) == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    assert_all_restore(workdir3)
