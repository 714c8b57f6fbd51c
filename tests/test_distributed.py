"""Many devices and many processes on CPU: the same numbers as one device, and checkpoints that resume.

Forced host devices (XLA_FLAGS) and `jax.distributed` need a fresh interpreter,
so every run, the one-device reference included, is a subprocess of a small
driver, all with the same XLA flags: cheap compilation (these programs are
tiny) and one shared compilation cache, so each program compiles once.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import FAST_XLA

from configs import tiny
from fcn import checkpoint, distributed, state as state_lib

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["--config.eval_batch_size=4"]  # divisible by 1, 2 and 4 devices
STEPS = tiny.get_config().num_steps  # checkpoints at 3 and 6
# Compiling at -O0 takes a third of the time; every run here uses the same flags.
LAUNCH_TIMEOUT = 180  # seconds for one two-process launch; 25 to 60 were needed on a busy 2-core machine

# Runs train.py's main in this process, saving this process's own copy of the parameters and
# BatchNorm statistics at every checkpoint (checking that the state is replicated) and the last
# evaluation report it computed; then, when asked, `python -m fcn.evaluate` on the latest checkpoint.
# Hooks for the tests: $FCN_TEST_HOLD_STEP holds each process before the batch of that step + 1
# (writing OUT/held_pN, waiting for OUT/go); process $FCN_TEST_SLOW_COMMIT is slow to finish its
# checkpoint writes, as one process of a busy machine is, so the other's background threads reach
# orbax's barriers between processes well before its own (the race that hung a CI run while the
# latest and best managers shared barrier names: see fcn/checkpoint.py); SIGUSR1 prints all stacks.
DRIVER = r"""
import faulthandler, json, os, signal, sys, time
from pathlib import Path
import numpy as np
faulthandler.register(signal.SIGUSR1, all_threads=True)
out, then_evaluate, argv = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
sys.modules["tensorboardX"] = None  # metrics.jsonl is enough here, and tensorboardX may import torch (seconds)
import jax
from orbax.checkpoint._src.checkpointers import async_checkpointer
from fcn import checkpoint, train
from fcn.cli import train_main
from fcn.data import pipeline

save = checkpoint.Checkpoints.save

def recording_save(self, step, state, **kw):
    save(self, step, state, **kw)
    for x in jax.tree.leaves(state):
        assert x.sharding.is_fully_replicated and len(x.sharding.device_set) == jax.device_count(), x.sharding
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves((state["params"], state["rest"]))]
    np.savez(f"{out}/weights_p{jax.process_index()}_s{step}.npz", *leaves)

run = train.train_and_evaluate

def recording_run(config, workdir):
    report = run(config, workdir)
    with open(f"{out}/report_p{jax.process_index()}.json", "w") as f:
        json.dump(report, f)
    return report

batch_indices = pipeline.batch_indices

def held_batch_indices(step, *args):
    if step == int(os.environ.get("FCN_TEST_HOLD_STEP", -1)):
        Path(f"{out}/held_p{jax.process_index()}").touch()
        deadline = time.monotonic() + 60
        while not Path(f"{out}/go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return batch_indices(step, *args)

wait_commit = async_checkpointer._background_wait_for_commit_futures

def slow_wait_commit(*args, **kwargs):
    if os.environ.get("FCN_TEST_SLOW_COMMIT") == str(jax.process_index()):
        time.sleep(1.5)
    return wait_commit(*args, **kwargs)

checkpoint.Checkpoints.save = recording_save
train.train_and_evaluate = recording_run
pipeline.batch_indices = held_batch_indices
async_checkpointer._background_wait_for_commit_futures = slow_wait_commit
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

# After training on 4 devices: evaluate the reference run there (also as if it had been trained
# with eval_batch_size=3, which 4 devices do not divide), and ask for impossible batch sizes.
FOUR_DEVICE_CHECKS = r"""
import json, shutil, sys
from configs import tiny
from fcn import cli, evaluate, sharding
from fcn.data import get_source
ref, out = sys.argv[1], sys.argv[2]
assert evaluate.main(["--workdir", ref, "--checkpoint", "latest", "--examples", "0"]) == 0
odd = Path(shutil.copytree(ref, out + "/odd_eval_batch"))
saved = json.loads((odd / "config.json").read_text())
(odd / "config.json").write_text(json.dumps({**saved, "eval_batch_size": 3}))
assert evaluate.main(["--workdir", str(odd), "--checkpoint", "latest", "--examples", "0"]) == 0
assert evaluate.main(["--workdir", str(odd), "--examples", "0", "--batch_size", "6"]) == 1
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
    cmd = [sys.executable, "-c", DRIVER, str(out), "0", "--workdir", str(out / "wd"), *OVERRIDES]
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
    # XLA's kernels in every run: oneDNN's (fcn/onednn.py) serve one device only, and the one-device
    # reference must compute what the others do (oneDNN's batch norm rounds otherwise: 1e-4 apart
    # after 6 steps).
    env["FCN_ONEDNN"] = "0"
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_four_devices_match_one_device(reference, cache, tmp_path):
    ref, ref_report = reference
    script = f"{DRIVER}\nsys.argv = [sys.argv[0], {str(ref / 'wd')!r}, {str(tmp_path)!r}]\n{FOUR_DEVICE_CHECKS}"
    cmd = [sys.executable, "-c", script, str(tmp_path), "0", "--workdir", str(tmp_path / "wd"), *OVERRIDES]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(cache, devices=4), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # The same global batch split over 4 devices: the same parameters, and BatchNorm statistics
    # of the global batch (XLA reduces the batch moments across devices).
    for step in (3, STEPS):
        _close(_saved(tmp_path, 0, step), _saved(ref, 0, step))
    # The same state evaluated on 4 devices: the very same confusion matrix.
    four = json.loads((ref / "wd" / f"eval_val_step{STEPS}.json").read_text())
    assert four["step"] == ref_report["step"]
    assert four["confusion_matrix"] == ref_report["confusion_matrix"]
    # A workdir's eval_batch_size that 4 devices do not divide is rounded up, with the same matrix;
    # a --batch_size they do not divide is refused, naming the flag.
    odd = json.loads((tmp_path / "odd_eval_batch" / f"eval_val_step{STEPS}.json").read_text())
    assert odd["confusion_matrix"] == ref_report["confusion_matrix"]
    assert "eval_batch_size=3 does not divide among 4 devices: evaluating 4 images at a time" in done.stderr
    assert "error: --batch_size=6 must be a positive multiple of the device count (4 devices" in done.stderr
    # Batch sizes the devices do not divide: one line naming the key and the device count.
    assert "error: config.batch_size=6 must be a positive multiple of the device count (4 devices" in done.stderr
    assert "config.eval_batch_size=2 must be a positive multiple of the device count (4 devices" in done.stderr
    assert "Traceback" not in done.stderr


def _two_processes(cache: Path, out: Path, name: str, *, evaluate: bool, use_env: bool, during=None, **env) -> list:
    """Train the tiny config with two processes (one CPU device each) sharing one workdir, OUT/wd.

    Returns each process's {"stdout", "stderr"}. Output goes to files: a full pipe
    must never stall one process while the other waits for it in a collective.
    `during(procs, deadline)` runs while they do. Past LAUNCH_TIMEOUT, or 30 s after one process
    failed, the test fails with the output of both, and the Python stacks of every
    thread of those still running; none is left behind.
    """
    port, procs, logs, problem, hung = _free_port(), [], [], None, []
    try:
        for pid in range(2):
            argv = ["--workdir", str(out / "wd"), *OVERRIDES]
            launch = {"coordinator": f"127.0.0.1:{port}", "num_processes": "2", "process_id": str(pid)}
            if use_env:  # the FCN_* variables
                penv = _env(cache, **{distributed.ENV[k]: v for k, v in launch.items()}, **env)
            else:  # the flags
                penv, argv = _env(cache, **env), argv + [f"--{k}={v}" for k, v in launch.items()]
            cmd = [sys.executable, "-c", DRIVER, str(out), "1" if evaluate else "0", *argv]
            logs.append({k: out / f"{name}_p{pid}.{k}" for k in ("stdout", "stderr")})
            with open(logs[-1]["stdout"], "w") as o, open(logs[-1]["stderr"], "w") as e:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=penv, stdout=o, stderr=e))
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        problem = during(procs, deadline) if during else None
        if problem:
            deadline = 0
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode for p in procs):  # one failed: the other may wait for it in a collective
                deadline = min(deadline, time.monotonic() + 30)
            time.sleep(0.2)
        hung = [pid for pid, p in enumerate(procs) if p.poll() is None]
        for pid in hung:
            procs[pid].send_signal(signal.SIGUSR1)  # faulthandler prints the stacks of all its threads
        if hung:
            time.sleep(3)
    finally:
        for p in procs:  # stragglers, after a timeout or a failure (or an interrupted test)
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    outs = [{k: path.read_text() for k, path in log.items()} for log in logs]
    if problem or hung or any(p.returncode for p in procs):
        what = problem or (f"process(es) {hung} had not exited (killed)" if hung else "a process failed")
        pytest.fail(
            f"{what}; exit codes {[p.returncode for p in procs]}\n"
            + "\n".join(f"--- process {pid} {k}, its end:\n{o[k][-6000:]}" for pid, o in enumerate(outs) for k in o),
            pytrace=False,
        )
    return outs


def _sigterm_to_process_1(out: Path):
    """`during`: with both processes held after step 1, pre-empt process 1 alone, then let both go on."""

    def during(procs, deadline: float) -> str | None:
        while not all((out / f"held_p{pid}").exists() for pid in range(2)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                return "the processes did not both reach step 1"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        time.sleep(2)  # JAX's preemption service polls for the notice every second
        (out / "go").touch()
        return None

    return during


def test_two_processes_train_like_one_stop_together_and_resume(reference, cache, tmp_path):
    """Two processes on 127.0.0.1: SIGTERM to one after step 1 stops both after the same step, each
    saving it and exiting 0; relaunched (process 1 slow to write its checkpoints), both resume from
    it, end with the weights of one process on one device, and evaluate the same confusion matrix."""
    ref, ref_report = reference
    first, second = _two_processes(
        cache,
        tmp_path,
        "stop",
        evaluate=False,
        use_env=False,
        during=_sigterm_to_process_1(tmp_path),
        FCN_TEST_HOLD_STEP="1",
    )
    # Both stop after the same step S, the one after the largest any had reached when JAX's
    # preemption service shared the notice: 2, unless the machine is slow to pass it on.
    stop = checkpoint.Checkpoints(tmp_path / "wd").latest_step()
    assert 2 <= stop < STEPS, first["stdout"]
    message = f"SIGTERM (or Ctrl-C) received by one of the 2 processes: saved a checkpoint at step {stop} in "
    assert message in first["stdout"] and "saved a checkpoint" not in second["stdout"]
    np.testing.assert_equal(_saved(tmp_path, 0, stop), _saved(tmp_path, 1, stop))
    lines = [json.loads(ln) for ln in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "loss" in ln] == list(range(1, stop + 1))  # no step past S

    first, second = _two_processes(cache, tmp_path, "resume", evaluate=True, use_env=True, FCN_TEST_SLOW_COMMIT="1")
    for o in (first, second):
        assert f"resuming {tmp_path / 'wd'} from step {stop}" in o["stderr"]
    # Both processes hold the very same weights, those of one process on one device.
    np.testing.assert_equal(_saved(tmp_path, 0, STEPS), _saved(tmp_path, 1, STEPS))
    _close(_saved(tmp_path, 0, STEPS), _saved(ref, 0, STEPS))
    _close(_weights(tmp_path / "wd"), _saved(ref, 0, STEPS))  # their checkpoint loads in one process
    # Metrics are reduced over both processes: each computed the whole confusion matrix.
    reports = [json.loads((tmp_path / f"report_p{pid}.json").read_text()) for pid in range(2)]
    assert reports[0]["confusion_matrix"] == reports[1]["confusion_matrix"]
    assert reports[0]["num_pixels"] == ref_report["num_pixels"]
    # `python -m fcn.evaluate` with both processes: the same matrix from the restored checkpoint.
    evaluated = json.loads((tmp_path / "wd" / f"eval_val_step{STEPS}.json").read_text())
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
    monkeypatch.setenv("FCN_PROCESS_ID", "2")  # a value is named as the user gave it: variable or flag
    with pytest.raises(ValueError, match=r"FCN_PROCESS_ID=2 must be in \[0, --num_processes=2\)"):
        distributed.maybe_initialize("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match=r"--num_processes=0 must be at least 1"):
        distributed.maybe_initialize("127.0.0.1:1234", 0, 0)
    for bad in ("127.0.0.1:x", "127.0.0.1:70000", ":1234"):  # jax failed with a traceback, "Failed to start RPC server"
        with pytest.raises(ValueError, match=f"--coordinator='{bad}' must be host:port of process 0, with a port in"):
            distributed.maybe_initialize(bad, 2, 0)
    monkeypatch.delenv("FCN_PROCESS_ID")

    # jax's errors in joining, e.g. process 0 not there: one line that says what to check.
    def unreachable(*args):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out\n(pages of gRPC details)")

    with monkeypatch.context() as patched:
        patched.setattr(jax.distributed, "initialize", unreachable)
        with pytest.raises(
            distributed.DistributedError,
            match=r"process 1 of 2 could not join the job through "
            r"10.0.0.1:1234: DEADLINE_EXCEEDED: Barrier timed out. Is process 0 running",
        ):
            distributed.maybe_initialize("10.0.0.1:1234", 2, 1)
    monkeypatch.setenv("FCN_DISTRIBUTED", "1")
    for name, value in [("SLURM_JOB_ID", "1"), ("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_NTASKS", "2")]:
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert distributed.detect_cluster() == "slurm"  # a step of `srun` with 2 tasks
    # The cluster's own path (jax.distributed.initialize() with no arguments) fails in one line too:
    # it was jax's traceback.
    with monkeypatch.context() as patched:
        patched.setattr(jax.distributed, "initialize", unreachable)
        with pytest.raises(
            distributed.DistributedError,
            match=r"^this process could not join its slurm job \(found by jax.distributed.initialize\(\)\): "
            r"DEADLINE_EXCEEDED: Barrier timed out. Check the job's settings, or set FCN_DISTRIBUTED=0",
        ):
            distributed.maybe_initialize()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert distributed.detect_cluster() != "slurm"  # the batch script itself


def test_coordinator_port_in_use_is_one_line(tmp_path):
    """Process 0 whose --coordinator port another program listens on: one line that says so, exit code 1.
    jax's own failure to listen there was a traceback ('Failed to start RPC server'), or a segmentation
    fault, in train.py."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["--workdir", str(tmp_path / "wd"), f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
        cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", *argv, "--process_id=0"]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert (
        f"error: process 0 of 2 cannot listen on port {port} (--coordinator=127.0.0.1:{port}): another" in done.stderr
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "wd").exists()
