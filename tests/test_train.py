"""Training end to end on the tiny config: learn, evaluate, stop, resume, report."""

import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import forked
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from fcn import checkpoint, state as state_lib
from fcn.data import get_source
from fcn.train import TrainingError, train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_model_overfits_one_batch():
    config = tiny.get_config()
    config.augment.scale_range = (1.0, 1.0)
    config.augment.hflip = False
    config.augment.brightness = config.augment.contrast = config.augment.saturation = 0.0
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule = "constant"
    config.num_steps = 100  # all 4 images right by step 50-75 (on a 2-core Xeon, 2026-11-22)
    config.model.features = 16
    split = get_source(config.data).load("train")
    images = np.stack(split.images[:4])
    labels = np.stack(split.labels[:4])
    sizes = np.array([lab.shape for lab in split.labels[:4]], np.int32)
    graphs, state, tx = state_lib.create(config, 4)
    step = state_lib.jit_train_step(config, graphs, tx, 4, 255)
    for _ in range(config.num_steps):
        state, out = step(state, images, labels, sizes)
    model = state_lib.eval_model(graphs, state)
    preds = np.asarray(jnp.argmax(model(images / 255.0), -1))
    assert (preds == labels).mean() > 0.99, float(out["train_accuracy"])


def test_a_log_file_gets_the_progress_bar_every_30_s_not_at_every_logged_step(tmp_path, capsys):
    config = tiny.get_config()  # log_every = 1; its num_steps, so that its training step is compiled already
    config.eval_every, config.checkpoint_every = 0, 0
    train_and_evaluate(config, tmp_path / "run")
    bars = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if "/6 [" in ln]
    # the bar at its start, once compiled, and at its end (seconds apart: well within 30 s); the postfix's
    # refresh printed it at each of the 6 logged steps too
    assert len(bars) <= 4, bars


def test_the_last_line_says_where_the_run_went(tmp_path, capsys):
    """The run ended with the report's table (or, with no evaluation, with the bar): nothing said where
    the checkpoints and metrics were, as fcn.evaluate and fcn.predict's last lines do."""
    config = tiny.get_config()  # as it is: evaluated at its last step, 6; its training step compiled already
    train_and_evaluate(config, tmp_path / "run")
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"trained to step 6: checkpoints and metrics in {tmp_path / 'run'}"


def test_zero_periods_mean_only_at_the_end(tmp_path):
    config = tiny.get_config()
    config.eval_every = config.checkpoint_every = config.log_every = 0
    train_and_evaluate(config, tmp_path / "run")
    assert checkpoint.Checkpoints(tmp_path / "run").latest_step() == config.num_steps
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines if "loss" in row] == [config.num_steps]


def test_nan_found_at_a_sparse_log_step_names_the_steps_it_may_have_begun_at(tmp_path, diverge_at):
    """With the loss read only at the end (log_every=0), weights gone NaN after step 3 are found at step 6:
    the error gives the steps it went unread, not step 6 as the step it began."""
    config = tiny.get_config()
    config.eval_every = config.checkpoint_every = config.log_every = 0
    diverge_at(3)
    with pytest.raises(TrainingError, match=r"^the training loss became nan between step 1 and step 6 \(it is read "):
        train_and_evaluate(config, tmp_path / "run")


@pytest.mark.parametrize("where", ["step", "evaluation", "state"])
def test_out_of_memory_is_one_line_saying_what_takes_less_and_checkpoints_stay(
    tmp_path, monkeypatch, capsys, caplog, oom_error, where
):
    """XLA's out-of-memory error (raised for real) in the training step of step 5, after checkpoint 3, in
    the evaluation at step 3, or creating the model's state: one error line, exit code 1, how much it asked
    for, the flags that take less; checkpoint 3 stays, and the same command resumes from it (it was a
    traceback)."""
    from fcn.cli import run_training

    def out_of_memory(*args, **kwargs):
        raise oom_error

    jit_train_step = state_lib.jit_train_step

    def failing_at_step_5(*args, **kwargs):
        train_step = jit_train_step(*args, **kwargs)
        return lambda state, *batch: out_of_memory() if state["step"] == 4 else train_step(state, *batch)

    if where == "step":
        monkeypatch.setattr(state_lib, "jit_train_step", failing_at_step_5)
    elif where == "evaluation":  # raised as the evaluation step is traced
        monkeypatch.setattr(state_lib, "make_eval_step", lambda *args, **kwargs: out_of_memory)
    else:
        monkeypatch.setattr(state_lib, "create", out_of_memory)
    workdir = tmp_path / "run"
    assert run_training(tiny.get_config(), str(workdir)) == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    oom = f"error: ran out of memory on the {jax.default_backend().upper()} (it tried to allocate 16 PiB)"
    if where == "step":
        assert errors[0].startswith(f"{oom} in the training step. The checkpoints are untouched (the latest: step 3).")
        flags = ["batch_size=2 (now 4)", "augment.crop_size=(12,16) (now (24,32))", "model.features=2 (now 4)"]
        for flag in [*flags, "model.depth=1 (now 2)", "model.dtype=bfloat16"]:
            assert f"--config.{flag}" in errors[0], flag
        assert errors[0].endswith(
            "run the command again to resume (a new model.features or depth needs a new --workdir)"
        )
    else:
        assert errors[0] == (
            f"{oom} evaluating on 'val' at step 3. No checkpoint was written. To use less memory try "
            "--config.eval_batch_size=1 (now 2); then run the command again"
            if where == "evaluation"
            else f"{oom} creating the model's state. No checkpoint was written. To use less memory try "
            "--config.model.features=2 (now 4) or --config.model.depth=1 (now 2); then run the command again"
        )
        return
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3]
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="fcn"):
        assert run_training(tiny.get_config(), str(workdir)) == 0
    assert f"resuming {workdir} from step 3" in caplog.text


def test_command_line_train_evaluate_resume(tmp_path, capsys):
    # FCN_JAX_CACHE: the session's cache (conftest.py). The first run is the tiny config as it is, which
    # the tests above compiled already; the second trains it for longer, resuming from the first's last step.
    # The three commands run one after the other, each as `python` runs it, forked from one process that has
    # imported JAX (tests/forked.py): a process of its own each, without 2 s of imports each.
    workdir = tmp_path / "run"
    train = ["train.py", "--config", "configs/tiny.py", "--workdir", workdir]
    commands = [train, [*train, "--config.num_steps=8"], ["-m", "fcn.evaluate", "--workdir", workdir, "--split", "val"]]
    first, done, ev = forked.run([{"args": args} for args in commands], jobs=1)
    assert first.returncode == 0, first.stderr
    assert done.returncode == 0, done.stderr
    assert f"resuming {workdir} from step {tiny.get_config().num_steps}" in done.stderr and "mean IoU" in done.stdout
    # Before the first step's compilation, which takes minutes on a GPU, the user is told where it is kept.
    assert "\ncompiling the training step, or reading it from the compilation cache in " in done.stderr  # plain
    assert os.environ["FCN_JAX_CACHE"] in done.stderr
    # Lines logged while the progress bar runs (the traced step kept) print above it, not after it.
    assert "training step traced and kept" in done.stderr
    bars = [seg for seg in re.split(r"[\r\n]", done.stderr) if "%|" in seg]
    assert bars and all(seg.rstrip().endswith("]") for seg in bars), bars
    lines = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines if "loss" in row] == list(range(1, 9))  # no step lost or repeated
    for name in ("config.json", "dataset.json", "metrics.jsonl", "checkpoints", "best", "tensorboard"):
        assert (workdir / name).exists(), name
    assert ev.returncode == 0, ev.stderr
    report = json.loads((workdir / "eval_val.json").read_text())
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou", "per_class"):
        assert key in report
    assert 0 <= report["pixel_accuracy"] <= 1
    assert [c["name"] for c in report["per_class"]] == ["background", "circle", "square", "triangle"]
    assert all({"name", "iou", "accuracy"} <= set(c) for c in report["per_class"])
    assert "mean IoU" in ev.stdout and "background" in ev.stdout
    for suffix in ("confusion", "iou", "examples"):
        assert (workdir / f"eval_val_{suffix}.png").stat().st_size > 1000

    # A data setting of the workdir's config overridden as train.py's are (e.g. the data's path when it
    # has moved): here the synthetic val split's size, which the report then counts (tiny.py: 5).
    from fcn import evaluate, trained

    capsys.readouterr()
    ev = evaluate.main(["--workdir", str(workdir), "--examples", "0", "--config.data.synthetic_counts.val", "3"])
    assert ev == 0 and "val split, 3 images" in capsys.readouterr().out
    assert json.loads((workdir / "config.json").read_text())["data"]["synthetic_counts"]["val"] == 5  # not saved
    # A misspelt data key is named with the closest one; a model or training setting is refused: those
    # are the workdir's.
    with pytest.raises(ValueError, match=re.escape("--config.data.pth: not a config field (did you mean path?)")):
        trained.restore(workdir, data_overrides=["--config.data.pth=/x"])
    with pytest.raises(ValueError, match="only --config.data.KEY=VALUE"):
        trained.restore(workdir, data_overrides=["--config.model.features=8"])
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--workdir", str(workdir), "--config.model.features=8"])
    assert exit_.value.code == 2


def test_unknown_config_key_is_named_with_suggestion(tmp_path):
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path)]
    cmd.append("--config.num_stepz=3")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "num_stepz" in out.stderr and "num_steps" in out.stderr and "Traceback" not in out.stderr


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    for flag in ("--config:", "--workdir:", "--coordinator:", "--num_processes:", "--process_id:"):
        assert flag in out.stdout, out.stdout
    assert "runs/camvid_cpu \\\n        [--config.optimizer.learning_rate" in out.stdout  # the usage, as typed


def tiny_eval_case():
    """(jitted eval step, state, val split, config, number of classes) of configs/tiny.py with 7 val
    images: 4 batches of 2, the last one short."""
    config = tiny.get_config()
    config.data.synthetic_counts.val = 7
    source = get_source(config.data)
    split = source.load("val")
    graphs, state, _ = state_lib.create(config, source.num_classes)
    step = jax.jit(state_lib.make_eval_step(graphs, source.num_classes, source.ignore_label))
    return step, state, split, config, source.num_classes


def test_evaluation_with_batches_in_flight_equals_one_at_a_time():
    """On CPU, evaluate_split runs two batches at once (fcn.evaluate.batches_in_flight); the confusion
    matrix and the kept examples must be those of one batch at a time, in the same order."""
    from fcn import evaluate, sharding

    step, state, split, config, num_classes = tiny_eval_case()
    mesh = sharding.make_mesh()
    run = lambda k: evaluate.evaluate_split(  # noqa: E731
        step, state, split, config, num_classes, mesh, keep_examples=5, in_flight=k
    )
    (cm1, kept1), (cm3, kept3) = run(1), run(3)
    assert cm1.sum() == sum(lab.size for lab in split.labels) and np.array_equal(cm1, cm3)
    assert len(kept1) == len(kept3) == 5
    for a, b in zip(kept1, kept3):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert evaluate.batches_in_flight() == (2 if jax.default_backend() == "cpu" else 1)


@pytest.mark.parametrize("model", ["reflect", "input_scale=0.5", "pad_mode=constant", "eval_hflip"])
def test_evaluation_predicts_what_the_model_predicts_on_each_image_alone(model):
    """Batched evaluation pads images of different sizes to a common one; no prediction may change for
    it. Padding the image as the model pads it works at input_scale 1, in every pad mode ("constant":
    black, as the model pads before normalising); a model that resizes its input pads after resizing.
    With eval_hflip the mirrored image had its padding before its first column, and predicted
    otherwise than the mirrored image alone (and than fcn.load(...).predict(hflip=True))."""
    from fcn import evaluate, sharding
    from fcn.data.base import Split

    config = tiny.get_config()
    config.model.depth = 3  # a multiple of 8: 21 x 30 and 19 x 27 share a padded size, 24 x 32
    if model == "input_scale=0.5":
        config.model.input_scale = 0.5
    elif model == "pad_mode=constant":
        config.model.pad_mode = "constant"
    config.eval_hflip = model == "eval_hflip"
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in [(21, 30), (19, 27), (21, 30)]]
    split = Split(images, [np.zeros(i.shape[:2], np.uint8) for i in images], ["a", "b", "c"])
    graphs, state, _ = state_lib.create(config, 4)
    step = jax.jit(state_lib.make_eval_step(graphs, 4, 255, hflip=config.eval_hflip))
    _, kept = evaluate.evaluate_split(step, state, split, config, 4, sharding.make_mesh(), keep_examples=3)
    model = state_lib.eval_model(graphs, state)
    assert sorted(image.shape for image, _, _ in kept) == sorted(image.shape for image in images)
    for image, _, pred in kept:  # (in batch order)
        x = jnp.asarray(image[None]) / 255.0
        logits = model(x) + (model(x[:, :, ::-1])[:, :, ::-1] if config.eval_hflip else 0)
        np.testing.assert_array_equal(pred, np.asarray(jnp.argmax(logits, -1))[0])


def test_cpu_training_starts_a_step_only_after_the_one_before(tmp_path, monkeypatch):
    # XLA:CPU keeps a step's temporaries in host memory until it ends; two steps overlapping hold two
    # sets (fcn.host_memory.one_step_at_a_time). The loop may prepare the next batch, but not dispatch early.
    from fcn import host_memory

    assert host_memory.one_step_at_a_time(jax.devices("cpu"))
    assert not host_memory.one_step_at_a_time([type("Gpu", (), {"platform": "gpu"})()])
    seen, frozen, before = [], [], gc.get_freeze_count()
    jit_train_step = state_lib.jit_train_step

    def recording(*args, **kwargs):
        step = jit_train_step(*args, **kwargs)
        previous = []

        def run(state, *batch):
            seen.append(all(x.is_ready() for x in jax.tree.leaves(previous)))
            frozen.append(gc.get_freeze_count())
            new_state, out = step(state, *batch)
            previous[:] = [out]
            return new_state, out

        return run

    monkeypatch.setattr(state_lib, "jit_train_step", recording)
    config = tiny.get_config()
    config.eval_every = config.checkpoint_every = config.log_every = 0
    config.num_steps = 6
    train_and_evaluate(config, tmp_path / "run")
    assert seen == [True] * 6
    # The loop's objects are frozen (gc.freeze: jax's, flax's, the step's, far more than Python 3.12's
    # own 375 it starts with), and handed back at its end.
    assert min(frozen) > before + 10_000 and gc.get_freeze_count() <= before, (before, frozen)


def test_logged_throughput_leaves_out_the_compilation(tmp_path, monkeypatch):
    """The first call of the step compiles (minutes on a GPU; 2 s here): images_per_sec of the first
    logged step counts the step only, not the compilation."""
    config = tiny.get_config()
    jit_train_step = state_lib.jit_train_step

    def compiling_slowly(*args, **kwargs):
        step, calls = jit_train_step(*args, **kwargs), []

        def run(*a):
            if not calls:
                time.sleep(2.0)
            calls.append(1)
            return step(*a)

        return run

    monkeypatch.setattr(state_lib, "jit_train_step", compiling_slowly)
    train_and_evaluate(config, tmp_path / "run", stop_after=1)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["images_per_sec"] > 2 * config.batch_size / 2.0, first


def test_progress_bar_clock_restarts_after_the_first_step():
    # The first step compiles (minutes on a GPU); the bar's rate and time left must not count it.
    import io
    import time

    from tqdm import tqdm

    from fcn.progress import restart_clock

    out = io.StringIO()
    bar = tqdm(total=100, initial=10, file=out, mininterval=0)
    time.sleep(0.6)  # "compiling"
    bar.update(1)
    assert bar.format_dict["elapsed"] >= 0.6
    restart_clock(bar)
    assert bar.n == 11 and bar.total == 100 and bar.format_dict["elapsed"] < 0.3
    assert " 0/100" not in out.getvalue() and out.getvalue().rstrip().endswith("11/100 [00:00<?, ?it/s]")
    for _ in range(5):
        bar.update(1)
    assert bar.n == 16 and bar.format_dict["elapsed"] < 0.3
    bar.close()


def test_evaluate_without_examples_leaves_no_earlier_examples_picture(tmp_path_factory, tmp_path, capsys):
    """`--examples 0` left an earlier run's eval_val_examples.png beside a report it no longer matched."""
    import shutil

    from test_inference import train_tiny

    from fcn import evaluate

    workdir = tmp_path / "run"
    shutil.copytree(train_tiny(tmp_path_factory), workdir)
    assert evaluate.main(["--workdir", str(workdir), "--examples", "1"]) == 0
    assert (workdir / "eval_val_examples.png").exists()
    assert evaluate.main(["--workdir", str(workdir), "--examples", "0"]) == 0
    assert not (workdir / "eval_val_examples.png").exists()
    assert (workdir / "eval_val.json").exists() and (workdir / "eval_val_iou.png").exists()
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--workdir", str(workdir), "--examples", "-1"])
    assert exit_.value.code == 2 and "--examples=-1: expected" in capsys.readouterr().err
