"""Ctrl-C outside the training loop: one line, exit code 130, and never lost (the loop's own handling,
which saves a checkpoint, is tested in test_faults.py)."""

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
HARNESS = """
import gc, os, runpy, signal, sys, time
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
