"""Many devices and many processes on CPU: the same numbers as one device, and checkpoints that resume.

Forced host devices (XLA_FLAGS) and `jax.distributed` need a fresh interpreter,
so every run, the one-device reference included, is a subprocess of a small
driver, all with the same XLA flags: cheap compilation (these programs are
tiny) and one shared compilation cache, so each program compiles once.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from fcn import checkpoint, distributed, state as state_lib

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["--config.eval_batch_size=4"]  # divisible by 1, 2 and 4 devices
STEPS = tiny.get_config().num_steps  # checkpoints at 3 and 6
# Compiling at -O0 takes a third of the time; every run here uses the same flags.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Runs train.py's main in this process, saving this process's own copy of the parameters and
# BatchNorm statistics at every checkpoint (checking that the state is replicated) and the last
# evaluation report it computed; then, when asked, `python -m fcn.evaluate` on the latest checkpoint.
DRIVER = r"""
import json, sys
import numpy as np
out, stop_after, then_evaluate, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
sys.modules["tensorboardX"] = None  # metrics.jsonl is enough here, and tensorboardX may import torch (seconds)
import jax
from fcn import checkpoint, train
from fcn.cli import train_main

save = checkpoint.Checkpoints.save

def recording_save(self, step, state, **kw):
    save(self, step, state, **kw)
    for x in jax.tree.leaves(state):
        assert x.sharding.is_fully_replicated and len(x.sharding.device_set) == jax.device_count(), x.sharding
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves((state["params"], state["rest"]))]
    np.savez(f"{out}/weights_p{jax.process_index()}_s{step}.npz", *leaves)

run = train.train_and_evaluate

def recording_run(config, workdir):
    report = run(config, workdir, stop_after=stop_after or None)
    with open(f"{out}/report_p{jax.process_index()}.json", "w") as f:
        json.dump(report, f)
    return report

checkpoint.Checkpoints.save = recording_save
train.train_and_evaluate = recording_run
try:
    train_main(["train.py", "--config", "configs/tiny.py", *argv])
except SystemExit as e:
    if e.code:
        raise
if then_evaluate:
    from fcn import evaluate
    workdir = argv[argv.index("--workdir") + 1]
    assert evaluate.main(["--workdir", workdir, "--checkpoint", "latest", "--examples", "0"]) == 0
"""

# After training on 4 devices: evaluate the reference run there, and ask for impossible batch sizes.
FOUR_DEVICE_CHECKS = r"""
import sys
from configs import tiny
from fcn import cli, evaluate, sharding
from fcn.data import get_source
ref, out = sys.argv[1], sys.argv[2]
assert evaluate.main(["--workdir", ref, "--checkpoint", "latest", "--examples", "0"]) == 0
config = tiny.get_config()
config.batch_size = 6
assert cli.run_training(config, out + "/bad") == 1  # prints the error
config = tiny.get_config()
try:
    evaluate.evaluate_split(None, None, get_source(config.data).load("val"), config, 4, sharding.make_mesh())
except ValueError as e:
    print(e, file=sys.stderr)
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _weights(workdir) -> list[np.ndarray]:
    """Parameters and BatchNorm statistics of a workdir's latest checkpoint, restored here (one device)."""
    config = checkpoint.load_config(workdir)
    _, abstract, _ = state_lib.abstract_state(config, 4)
    ckpts = checkpoint.Checkpoints(workdir)
    state = ckpts.restore(abstract)
    ckpts.close()
    return [np.asarray(x) for x in jax.tree.leaves((state["params"], state["rest"]))]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """The tiny config trained by one process on one device: (output folder, last report)."""
    out = tmp_path_factory.mktemp("reference")
    cmd = [sys.executable, "-c", DRIVER, str(out), "0", "0", "--workdir", str(out / "wd"), *OVERRIDES]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "report_p0.json").read_text())


def _saved(out: Path, process: int, step: int) -> list[np.ndarray]:
    with np.load(out / f"weights_p{process}_s{step}.npz") as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def _env(cache: Path, devices: int = 1, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", *distributed.ENV.values())}
    xla = FAST_XLA + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
    env.update(XLA_FLAGS=xla, FCN_JAX_CACHE=str(cache), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_four_devices_match_one_device(reference, cache, tmp_path):
    ref, ref_report = reference
    script = f"{DRIVER}\nsys.argv = [sys.argv[0], {str(ref / 'wd')!r}, {str(tmp_path)!r}]\n{FOUR_DEVICE_CHECKS}"
    cmd = [sys.executable, "-c", script, str(tmp_path), "0", "0", "--workdir", str(tmp_path / "wd"), *OVERRIDES]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(cache, devices=4), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # The same global batch split over 4 devices: the same parameters, and BatchNorm statistics
    # of the global batch (XLA reduces the batch moments across devices).
    for step in (3, STEPS):
        _close(_saved(tmp_path, 0, step), _saved(ref, 0, step))
    # The same state evaluated on 4 devices: the very same confusion matrix.
    four = json.loads((ref / "wd" / "eval_val.json").read_text())
    assert four["step"] == ref_report["step"]
    assert four["confusion_matrix"] == ref_report["confusion_matrix"]
    # Batch sizes the devices do not divide: one line naming the key and the device count.
    assert "error: config.batch_size=6 must be a positive multiple of the device count (4 devices" in done.stderr
    assert "config.eval_batch_size=2 must be a positive multiple of the device count (4 devices" in done.stderr
    assert "Traceback" not in done.stderr


def _two_processes(cache: Path, out: Path, stop_after: int, use_env: bool) -> list[dict]:
    """Train the tiny config with two processes (one CPU device each) sharing one workdir.

    Returns each process's {"stdout", "stderr"}. Output goes to files: a full pipe
    must never stall one process while the other waits for it in a collective.
    """
    port, procs, logs = _free_port(), [], []
    try:
        for pid in range(2):
            argv = ["--workdir", str(out / "wd"), *OVERRIDES]
            launch = {"coordinator": f"127.0.0.1:{port}", "num_processes": "2", "process_id": str(pid)}
            if use_env:  # the FCN_* variables
                env = _env(cache, **{distributed.ENV[k]: v for k, v in launch.items()})
            else:  # the flags
                env, argv = _env(cache), argv + [f"--{k}={v}" for k, v in launch.items()]
            cmd = [sys.executable, "-c", DRIVER, str(out), str(stop_after), "0" if stop_after else "1", *argv]
            logs.append({k: out / f"p{pid}_s{stop_after}.{k}" for k in ("stdout", "stderr")})
            with open(logs[-1]["stdout"], "w") as o, open(logs[-1]["stderr"], "w") as e:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=o, stderr=e))
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:  # stragglers, after a timeout or a failure
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    outs = [{k: path.read_text() for k, path in log.items()} for log in logs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o["stderr"][-3000:]
    return outs


@pytest.mark.skipif(
    os.environ.get("FCN_TEST_MULTIPROCESS") != "1",
    reason="intermittent hang (a run did not exit within 240 s in 1 of 3 clean-clone CI runs, 2026-11-21) "
    "under investigation; run with FCN_TEST_MULTIPROCESS=1",
)
def test_two_processes_train_like_one_and_resume(reference, cache, tmp_path):
    ref, ref_report = reference
    _two_processes(cache, tmp_path, stop_after=2, use_env=False)
    assert checkpoint.Checkpoints(tmp_path / "wd").latest_step() == 2
    np.testing.assert_equal(_saved(tmp_path, 0, 2), _saved(tmp_path, 1, 2))
    first, second = _two_processes(cache, tmp_path, stop_after=0, use_env=True)
    for o in (first, second):
        assert "resuming" in o["stderr"] and "from step 2" in o["stderr"]
    # Both processes hold the very same weights, those of one process on one device.
    np.testing.assert_equal(_saved(tmp_path, 0, STEPS), _saved(tmp_path, 1, STEPS))
    _close(_saved(tmp_path, 0, STEPS), _saved(ref, 0, STEPS))
    _close(_weights(tmp_path / "wd"), _saved(ref, 0, STEPS))  # their checkpoint loads in one process
    # Metrics are reduced over both processes: each computed the whole confusion matrix.
    reports = [json.loads((tmp_path / f"report_p{pid}.json").read_text()) for pid in range(2)]
    assert reports[0]["confusion_matrix"] == reports[1]["confusion_matrix"]
    assert reports[0]["num_pixels"] == ref_report["num_pixels"]
    # `python -m fcn.evaluate` with both processes: the same matrix from the restored checkpoint.
    evaluated = json.loads((tmp_path / "wd" / "eval_val.json").read_text())
    assert evaluated["step"] == STEPS and evaluated["confusion_matrix"] == reports[0]["confusion_matrix"]
    # Process 0 alone reports and logs, each step once.
    assert "mean IoU" in first["stdout"] and "wrote" in first["stdout"]
    assert "mean IoU" not in second["stdout"] + second["stderr"] and "wrote" not in second["stdout"]
    lines = [json.loads(ln) for ln in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "loss" in ln] == list(range(1, STEPS + 1))


def test_multi_process_settings_are_checked(monkeypatch):
    for name in distributed.ENV.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FCN_DISTRIBUTED", "0")
    assert distributed.maybe_initialize() is False  # nothing set: one process
    assert distributed.maybe_initialize("127.0.0.1:1234", 1, 0) is False  # one process of one
    with pytest.raises(ValueError, match="missing: --num_processes"):
        distributed.maybe_initialize("127.0.0.1:1234", None, 0)
    monkeypatch.setenv("FCN_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
        distributed.maybe_initialize("127.0.0.1:1234", 2)
    monkeypatch.setenv("FCN_DISTRIBUTED", "1")
    for name, value in [("SLURM_JOB_ID", "1"), ("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_NTASKS", "2")]:
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert distributed.detect_cluster() == "slurm"  # a step of `srun` with 2 tasks
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert distributed.detect_cluster() != "slurm"  # the batch script itself
