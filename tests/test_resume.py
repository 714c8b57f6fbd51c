"""Resuming a workdir: a stopped run resumed equals an unbroken one; a finished one is left as it is;
one stopped at step k and given num_steps=k evaluates step k, once, best/ before its metrics line."""

import json

import jax
import numpy as np
import pytest

from configs import tiny
from fcn import checkpoint, state as state_lib
from fcn.train import train_and_evaluate


def _params(workdir):
    config = checkpoint.load_config(workdir)
    _, abstract, _ = state_lib.abstract_state(config, 4)
    ckpts = checkpoint.Checkpoints(workdir)
    restored = ckpts.restore(abstract)
    ckpts.close()
    return restored


def test_stopped_and_resumed_run_equals_unbroken_run(tmp_path):
    config = tiny.get_config()
    train_and_evaluate(config, tmp_path / "a")
    train_and_evaluate(config, tmp_path / "b", stop_after=2)
    assert checkpoint.Checkpoints(tmp_path / "b").latest_step() == 2
    train_and_evaluate(config, tmp_path / "b", stop_after=1)
    train_and_evaluate(config, tmp_path / "b")
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert int(a["step"]) == int(b["step"]) == config.num_steps
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    lines = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [row["step"] for row in lines if "loss" in row]
    assert train_steps == list(range(1, config.num_steps + 1))  # no step lost or repeated


def test_running_a_finished_workdir_again_says_there_is_nothing_to_train(tmp_path, capsys):
    """Nothing in the workdir changes, config.json included: run again with other settings (here a
    learning rate and seed), it was rewritten with them, though no step was trained with them."""
    config = tiny.get_config()
    train_and_evaluate(config, tmp_path / "run")
    capsys.readouterr()
    files = {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}
    config.optimizer.learning_rate, config.seed = 0.5, 7
    assert train_and_evaluate(config, tmp_path / "run") == {}
    # not even an events file, and every file's bytes as they were
    assert {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()} == files
    captured = capsys.readouterr()
    assert f"{tmp_path / 'run'} is trained to step 6 already (config.num_steps): nothing to train." in captured.out
    assert "python -m fcn.evaluate --workdir" in captured.out
    assert "6/6" not in captured.err  # and no progress bar at 100% under it


def test_a_run_stopped_then_given_num_steps_at_its_stop_evaluates_that_step_once(tmp_path, capsys):
    """Stopped at step 2 of 6 (not an evaluation step), then run with num_steps=2: its last step is
    evaluated (metrics.jsonl, best/, the report), where it said "nothing to train" and left the final
    weights unevaluated, with no best/ at all. config.json keeps the settings trained with; run once
    more, it is a workdir evaluated at its last step: nothing to train, nothing written."""
    config, run = tiny.get_config(), tmp_path / "run"  # its 6 steps: the training step the other tests compile
    train_and_evaluate(config, run, stop_after=2)
    config_json = (run / "config.json").read_bytes()
    config.num_steps = 2
    capsys.readouterr()
    rep = train_and_evaluate(config, run)
    out = capsys.readouterr().out
    assert rep["step"] == 2 and f"{run} is trained to step 2 (config.num_steps), not evaluated there" in out
    assert "mean IoU" in out and "nothing to train" not in out
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["eval_mean_iou"]) for row in rows if "eval_mean_iou" in row] == [(2, rep["mean_iou"])]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    ckpts = checkpoint.Checkpoints(run)
    try:
        assert ckpts.best.all_steps() == [2] and ckpts.latest.all_steps() == [2]
        assert ckpts.best.metrics(2)["mean_iou"] == rep["mean_iou"]
    finally:
        ckpts.close()
    assert (run / "config.json").read_bytes() == config_json  # num_steps=6: the schedule trained with
    files = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert train_and_evaluate(config, run) == {}
    assert "nothing to train" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == files


def test_a_final_evaluation_whose_best_save_failed_is_done_again_by_the_next_run(tmp_path, monkeypatch):
    """The final evaluation's metrics.jsonl line says that step k is evaluated. Written before best/ was saved,
    a failed save (a full disk: "re-run to resume") left the line, and the re-run said "nothing to train"
    with step k, the best, never in best/. The line comes after best/ now: the re-run evaluates and saves it."""
    config, run = tiny.get_config(), tmp_path / "run"
    train_and_evaluate(config, run, stop_after=2)  # step 2 of 6: no evaluation, best/ empty
    config.num_steps = 2
    save = checkpoint.Checkpoints.save

    def disk_full(self, step, state, **kwargs):
        raise checkpoint.CheckpointError(f"could not write a checkpoint at step {step} in {run}: disk full")

    monkeypatch.setattr(checkpoint.Checkpoints, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match="disk full"):
        train_and_evaluate(config, run)
    monkeypatch.setattr(checkpoint.Checkpoints, "save", save)
    rep = train_and_evaluate(config, run)
    assert rep["step"] == 2
    ckpts = checkpoint.Checkpoints(run)
    try:
        assert ckpts.best.all_steps() == [2] and ckpts.best.metrics(2)["mean_iou"] == rep["mean_iou"]
    finally:
        ckpts.close()
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "eval_mean_iou" in row] == [2]  # one line, the second run's
