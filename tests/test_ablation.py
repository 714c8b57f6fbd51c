"""scripts/ablation.py: its overrides (as train.py's --config.key=value) and its report."""

import argparse
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablation", ROOT / "scripts" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)
TINY = str(ROOT / "configs" / "tiny.py")


def test_overrides_parse_as_train_py_parses_them():
    c = ablation.load_config(
        TINY,
        [
            "augment.crop_size=(16, 24)",
            "eval_hflip=True",
            "optimizer.learning_rate=1",
            "num_steps=7",
            "model.dtype=bfloat16",
        ],
    )
    assert c.augment.crop_size == (16, 24)
    assert c.eval_hflip is True
    assert c.optimizer.learning_rate == 1.0 and isinstance(c.optimizer.learning_rate, float)
    assert c.num_steps == 7
    assert c.model.dtype == "bfloat16"


@pytest.mark.parametrize(
    "item, names",
    [
        ("num_stepz=3", "num_steps"),
        ("num_steps=abc", "num_steps"),
        ("seed", "seed"),
    ],
)
def test_bad_overrides_name_the_key(item, names):
    with pytest.raises(SystemExit) as e:
        ablation.load_config(TINY, [item])
    assert names in str(e.value) and item.split("=")[0] in str(e.value)


def test_report_only_tabulates_finished_runs(tmp_path, monkeypatch):
    # Two finished seeds of `linear`, one unfinished of `stacked`: only linear is reported.
    def write(name, seed, miou, last_step):
        d = tmp_path / f"{name}_s{seed}"
        d.mkdir()
        rows = [{"step": s, "loss": 1.0 / s, "images_per_sec": 10.0 + s} for s in range(1, last_step + 1)]
        if last_step == 6:
            rows.append({"step": 6, "eval_mean_iou": miou})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("linear", 0, 0.30, 6)
    write("linear", 1, 0.40, 6)
    write("stacked", 0, 0.50, 3)
    monkeypatch.setattr(sys, "argv", ["ablation.py"])
    monkeypatch.setattr("fcn.cli.retain_memory", lambda: False)  # leave this process's malloc settings alone
    assert (
        ablation.main(
            ["--config", TINY, "--seeds", "0,1", "--out", str(tmp_path), "--report_only", "--flops_size", "24", "32"]
        )
        == 0
    )
    table = (tmp_path / "ablation.md").read_text()
    lines = [row for row in table.splitlines() if row.startswith("| linear ")]
    assert len(lines) == 1 and "stacked" not in table
    assert "35.00 ± 7.07" in lines[0]  # mean and sample std (ddof=1) of 30 and 40
    assert "30.0, 40.0" in lines[0]
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


def test_a_run_stopped_by_a_signal_stops_the_ablation_without_a_report(tmp_path, monkeypatch, capsys):
    """Ctrl-C saves the run in progress and train_and_evaluate returns (stop_after stands in for the
    signal). The ablation took that run for finished: with no evaluation yet, np.mean of None was a
    TypeError; after one, it trained the next variant and tabulated the cut-short run."""
    import fcn.train

    train = fcn.train.train_and_evaluate
    monkeypatch.setattr(fcn.train, "train_and_evaluate", lambda config, workdir: train(config, workdir, stop_after=4))
    monkeypatch.setattr("fcn.cli.retain_memory", lambda: False)
    argv = ["--config", TINY, "--seeds", "0", "--out", str(tmp_path), "--flops_size", "24", "32"]
    assert ablation.main(argv) == 130  # tiny: an evaluation at step 3, the run stopped at 4 of 6
    assert "ablation stopped at" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear_s0"]  # no next variant, no ablation.md


def test_a_bad_override_value_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("fcn.cli.retain_memory", lambda: False)
    argv = ["--config", TINY, "--seeds", "0", "--out", str(tmp_path), "--override", "batch_size=100"]
    assert ablation.main(argv) == 1  # was a ConfigError's traceback
    assert "error: config.batch_size=100 is larger than the 16 training examples" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_config_file_that_cannot_be_loaded_and_bad_seeds_are_one_line(tmp_path, capsys):
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    for path, words in [
        (tmp_path / "nowhere.py", "nowhere.py: no such file"),  # was an OSError's traceback
        (tmp_path / "syntax.py", "syntax.py, line 1: SyntaxError"),  # was the SyntaxError's
    ]:
        with pytest.raises(SystemExit) as e:
            ablation.load_config(str(path), [])
        assert str(e.value).startswith("error: flag --config=") and words in str(e.value)
    with pytest.raises(SystemExit) as e:  # was int()'s ValueError, after the config was loaded
        ablation.main(["--config", TINY, "--seeds", "0,x", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--seeds='0,x': expected integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # was one run per variant tabulated twice: "± 0.00" over "two seeds"
        ablation.main(["--config", TINY, "--seeds", "0,1,0", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--seeds='0,1,0': seed 0 twice" in capsys.readouterr().err


def test_one_seed_or_no_logged_speed_is_said_not_printed_as_nan(tmp_path):
    # `bash scripts/run_gpu.sh ablation --smoke --seeds 0` printed "0.39 ± nan".
    args = argparse.Namespace(config=TINY, seeds="0", out=str(tmp_path), override=[], flops_size=(24, 32))
    rows = [
        ("linear", 0.39, float("nan"), [0.39], 7599, 2e9, 27.0),
        ("mlp", 0.5, float("nan"), [0.5], 7619, 2e9, float("nan")),
    ]
    ablation.write_report(tmp_path, rows, {"linear": ([1, 2], [1.0, 0.5])}, args)
    table = (tmp_path / "ablation.md").read_text()
    assert "nan" not in table
    assert "| linear | 39.00 (one seed) | 39.0 | 7,599 | 2.0 | 27.0 |" in table
    assert "| mlp | 50.00 (one seed) | 50.0 | 7,619 | 2.0 | not logged |" in table


@pytest.mark.parametrize("report_only", [True, False])
def test_a_final_evaluation_that_scored_no_pixel_is_one_error_line(tmp_path, monkeypatch, capsys, report_only):
    """metrics.jsonl records such an evaluation's mean IoU as null. The ablation took the run for
    unfinished: --report_only left it out without a word, and a training run was said to be
    "stopped by a signal" (exit 130), though re-running would change nothing."""
    d = tmp_path / "linear_s0"
    rows = [{"step": s, "loss": 1.0, "images_per_sec": 10.0} for s in range(1, 7)] + [
        {"step": 6, "eval_mean_iou": None}
    ]

    def run_training(config, workdir):  # the run as train.py would leave it
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0

    if report_only:
        run_training(None, d)
    monkeypatch.setattr("fcn.cli.run_training", run_training)
    monkeypatch.setattr("fcn.cli.retain_memory", lambda: False)
    argv = ["--config", TINY, "--seeds", "0", "--out", str(tmp_path), "--flops_size", "24", "32"]
    assert ablation.main(argv + ["--report_only"] * report_only) == 1
    err = capsys.readouterr().err
    assert f"error: {d}: the final evaluation scored no pixel" in err and "ignore_label=255" in err
    assert "stopped" not in err and not (tmp_path / "ablation.md").exists()


@pytest.mark.parametrize("out_exists", [True, False])
def test_report_only_without_a_finished_run_is_one_error_line_and_keeps_the_table(
    tmp_path, monkeypatch, capsys, out_exists
):
    """--report_only on an --out holding none of the sweep's finished runs (a mistyped folder, other seeds): a
    FileNotFoundError's traceback where --out did not exist, else an ablation.md of headers only over the table."""
    out = tmp_path / "ablation"
    if out_exists:
        out.mkdir()
        (out / "ablation.md").write_text("the earlier table\n")
    monkeypatch.setattr("fcn.cli.retain_memory", lambda: False)
    argv = ["--config", TINY, "--seeds", "0", "--out", str(out), "--report_only", "--flops_size", "24", "32"]
    assert ablation.main(argv) == 1
    assert f"error: --out {out} holds no finished run of seeds 0" in capsys.readouterr().err
    if out_exists:
        assert (out / "ablation.md").read_text() == "the earlier table\n"
        assert not (out / "loss_curves.png").exists()
    else:
        assert not out.exists()


def test_a_run_resumed_after_a_stop_between_log_steps_is_tabulated_with_the_others(tmp_path, monkeypatch):
    """A run stopped by a signal logs its loss at the step it stopped at (its checkpoint's); resumed, it keeps
    that line, so its metrics.jsonl has one loss step more than an uninterrupted seed's. Averaging the seeds'
    curves then ended the sweep with numpy's 'inhomogeneous shape' ValueError, and no table."""

    def write(seed, steps):
        d = tmp_path / f"linear_s{seed}"
        d.mkdir()
        rows = [{"step": s, "loss": 1.0 / s + seed, "images_per_sec": 10.0} for s in steps]
        rows.append({"step": 6, "eval_mean_iou": 0.3 + 0.1 * seed})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(0, [1, 2, 4, 6])  # stopped at step 1, then resumed: logged at 2, 4, 6 as seed 1 was
    write(1, [2, 4, 6])
    curves = {}
    monkeypatch.setattr(ablation, "write_report", lambda out, rows, c, args: curves.update(c))
    monkeypatch.setattr("fcn.cli.retain_memory", lambda: False)
    argv = ["--config", TINY, "--seeds", "0,1", "--out", str(tmp_path), "--report_only", "--flops_size", "24", "32"]
    assert ablation.main(argv) == 0
    steps, loss = curves["linear"]
    assert list(steps) == [2, 4, 6]  # the steps every seed logged
    assert list(loss) == pytest.approx([0.5 + 0.5, 0.25 + 0.5, 1 / 6 + 0.5])


@pytest.mark.parametrize("item", ["model.head=mlp", "model.bottleneck=2", "seed=3"])
def test_an_override_of_what_the_sweep_sets_is_refused(tmp_path, monkeypatch, capsys, item):
    """The sweep sets config.seed, model.head and model.bottleneck for each run: such an --override was
    silently replaced (every variant trained, bottleneck 4 not 2), yet the table's command listed it."""
    monkeypatch.setattr("fcn.cli.run_training", lambda config, workdir: pytest.fail("trained"))
    argv = ["--config", TINY, "--seeds", "0", "--out", str(tmp_path / "out"), "--override", item]
    with pytest.raises(SystemExit) as e:
        ablation.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--override {item}" in err and ("--seeds" if item == "seed=3" else "variant") in err
    assert not (tmp_path / "out").exists()


def test_the_tables_command_is_the_one_that_was_run(tmp_path):
    """The command above the table left out --flops_size, so run again it gave another GFLOPs column, and
    it quoted none of the other values: a --seeds '0, 1' or an --out with a space gave a broken command."""
    out = tmp_path / "my runs"
    out.mkdir()
    args = argparse.Namespace(config=TINY, seeds="0, 1", out=str(out), override=["seed_x=1"], flops_size=(24, 32))
    ablation.write_report(out, [("linear", 0.39, 0.01, [0.38, 0.4], 7599, 2e9, 27.0)], {"linear": ([1], [1.0])}, args)
    command = (out / "ablation.md").read_text().splitlines()[0]
    assert command.startswith("Command: `") and command.endswith("`")
    want = ["python", "scripts/ablation.py", "--config", TINY, "--seeds", "0, 1", "--out", str(out)]
    assert shlex.split(command[len("Command: `") : -1]) == want + ["--override", "seed_x=1", "--flops_size", "24", "32"]


def test_a_source_without_the_eval_split_is_one_error_line_before_training(tmp_path, monkeypatch, capsys):
    """A run on data without config.data.eval_split trains without evaluation (a warning): the ablation
    trained it to the end, then said 'ablation stopped at ...: run the same command again to resume'
    (exit 130), and so again at every re-run, as the run never gets the evaluation it waits for."""
    monkeypatch.setattr("fcn.cli.run_training", lambda config, workdir: pytest.fail("trained"))
    monkeypatch.setattr("fcn.cli.retain_memory", lambda: False)
    argv = ["--config", TINY, "--seeds", "0", "--out", str(tmp_path / "out"), "--override", "data.eval_split=test"]
    assert ablation.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: config.data.eval_split='test'" in err and "train, val" in err and "stopped" not in err
    assert not (tmp_path / "out").exists()


def test_a_finished_run_is_read_not_started_again(tmp_path, monkeypatch):
    """Re-running a sweep (the next GPU slice) started every finished run again: train.py loaded the data and
    the state only to say "nothing to train". A finished run's metrics.jsonl is now read as --report_only reads
    it; an unfinished one is still trained."""
    for seed in (0, 1):
        d = tmp_path / f"linear_s{seed}"
        d.mkdir()
        rows = [{"step": s, "loss": 1.0 / s, "images_per_sec": 10.0} for s in range(1, 7)]
        (d / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in [*rows, {"step": 6, "eval_mean_iou": 0.3}])
        )
    trained = []

    def run_training(config, workdir):  # every other variant: trained, and left finished
        trained.append(workdir.name)
        workdir.mkdir(exist_ok=True)
        rows = [{"step": 6, "loss": 0.5, "images_per_sec": 10.0}, {"step": 6, "eval_mean_iou": 0.2}]
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0

    monkeypatch.setattr("fcn.cli.run_training", run_training)
    monkeypatch.setattr("fcn.cli.retain_memory", lambda: False)
    argv = ["--config", TINY, "--seeds", "0,1", "--out", str(tmp_path), "--flops_size", "24", "32"]
    assert ablation.main(argv) == 0
    assert "linear_s0" not in trained and "linear_s1" not in trained and "stacked_s0" in trained
    assert "| linear | 30.00 ± 0.00 | 30.0, 30.0 |" in (tmp_path / "ablation.md").read_text()
