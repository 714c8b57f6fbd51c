"""Ctrl-C outside the training loop: one line, exit code 130, and never lost (the loop's own handling,
which saves a checkpoint, is tested in test_faults.py); and out of memory in evaluate and predict, one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# train.py, with a gc callback that sends this process SIGINT once the run has begun (fcn.train
# imported) and waits inside the callback for it to be handled there. JAX keeps such a callback
# (jax._src.lib._xla_gc_callback, run at every collection); Python drops an exception raised in one,
# so a Ctrl-C that arrived during one while the command started was lost, and the run trained on.
# It first gives SIGINT Python's handler, as a command typed at a terminal has it: a process started in
# the background by a non-interactive shell (`pytest ... &`) inherits SIGINT ignored, which fcn leaves
# ignored, and the run then trained on whatever the code did.
HARNESS = """
import gc, os, runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {root!r})
fired = []

def callback(phase, info):
    if phase == "start" and not fired and "fcn.train" in sys.modules:
        fired.append(True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # handled here, inside the callback

gc.callbacks.insert(0, callback)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_ctrl_c_during_a_gc_callback_at_startup_stops_the_run_with_exit_code_130(tmp_path):
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS.format(root=str(ROOT), train=str(ROOT / "train.py")))
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(harness), "--config", "configs/tiny.py", "--workdir", str(workdir)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stdout + done.stderr
    assert "interrupted (Ctrl-C): the same command resumes from the latest checkpoint" in done.stderr
    assert "Traceback" not in done.stderr and "mean IoU" not in done.stdout
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_ctrl_c_while_loading_is_one_line_and_exit_code_130(tmp_path, monkeypatch, capsys, command):
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module = importlib.import_module(f"fcn.{command}")
    if command == "evaluate":
        monkeypatch.setattr(module, "_evaluate", interrupted)
        argv = ["--workdir", str(tmp_path)]
    else:
        monkeypatch.setattr("fcn.inference.load", interrupted)
        (tmp_path / "x.png").write_bytes(b"read after loading")
        argv = ["--workdir", str(tmp_path), "--out", str(tmp_path / "out")]
        argv += [str(tmp_path / "x.png")] if command == "predict" else ["--no_saved_model"]
    with pytest.raises(SystemExit) as e:
        try:
            module.main(argv)
        except KeyboardInterrupt:  # raised on, it would stop the whole test session
            pytest.fail("KeyboardInterrupt escaped main(): a traceback and no message")
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted (Ctrl-C)"


@pytest.mark.parametrize("where", ["evaluate", "evaluate restoring", "predict"])
def test_out_of_memory_in_evaluate_and_predict_is_one_line_naming_the_flag(
    tmp_path_factory, tmp_path, monkeypatch, capsys, oom_error, where
):
    """XLA's out-of-memory error (raised for real) while evaluating, restoring the checkpoint (not taken for
    corrupt files) or predicting: one line saying how much and the flag that takes less, exit code 1."""
    import jax
    from orbax import checkpoint as ocp
    from PIL import Image
    from test_inference import train_tiny

    from fcn import evaluate, inference, predict, state as state_lib
    from fcn.data.synthetic import make_example

    def out_of_memory(*args, **kwargs):
        raise oom_error

    workdir = train_tiny(tmp_path_factory)
    if where == "predict":
        monkeypatch.setattr(inference.Segmenter, "predict", out_of_memory)
        Image.fromarray(make_example(0, 0, (20, 30))[0]).save(tmp_path / "x.png")
        code = predict.main(["--workdir", workdir, "--out", str(tmp_path / "out"), str(tmp_path / "x.png")])
    else:
        if where == "evaluate restoring":
            monkeypatch.setattr(ocp.CheckpointManager, "restore", out_of_memory)
        monkeypatch.setattr(state_lib, "make_eval_step", lambda *args, **kwargs: out_of_memory)
        code = evaluate.main(["--workdir", workdir, "--hflip", "--examples", "0"])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    oom = f"error: ran out of memory on the {jax.default_backend().upper()} (it tried to allocate 16 PiB)"
    if where == "predict":
        assert errors[0] == (
            f"{oom} predicting with {workdir}; to use less memory try --tile=256 (now 512: images and tiles of up "
            "to 512 x 512 px, a few at a time)"
        )
    elif where == "evaluate":
        assert errors[0] == (
            f"{oom} evaluating {workdir} on 'val'; to use less memory try --batch_size=1 (now 2) or without --hflip"
        )
    else:  # it said the checkpoint's files were incomplete or corrupt
        assert errors[0] == f"{oom} loading {workdir}: its model does not fit in this device's memory"
