"""What a training run does before its first step: the state in one compilation, no torch or TensorFlow.

How long it takes is measured in benchmarks/first_step.py, not here.
"""

import importlib.util
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from fcn import state as state_lib
from fcn.model import from_config

ROOT = Path(__file__).resolve().parents[1]


def test_state_is_created_by_one_compilation_with_the_eager_values():
    config = tiny.get_config()
    compiled = []

    def listener(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        _, state, _ = state_lib.create(config, 4)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiled) == 1, compiled
    # The same numbers as building the model outside jit, initialiser by initialiser (both compiled
    # unoptimised on CPU: fcn.model.eager_fast), bit for bit.
    _, params, rest = nnx.split(from_config(config.model, 4, rngs=nnx.Rngs(config.seed)), nnx.Param, ...)
    got, want = jax.tree.leaves((state["params"], state["rest"])), jax.tree.leaves((params, rest))
    assert [x.shape for x in got] == [x.shape for x in want]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None, reason="tensorboardX not installed")
def test_training_modules_and_tensorboard_logging_import_no_torch_or_tensorflow(tmp_path):
    """tensorboardX imports torch when it can (seconds at every start); the metrics log keeps it out.

    Where torch is not installed, a stand-in `torch` package is put on the path, so the
    check means the same everywhere.
    """
    env = dict(os.environ)
    if importlib.util.find_spec("torch") is None:
        fake = tmp_path / "fake" / "torch"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text('__version__ = "0.0"\n')
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "fake"), env.get("PYTHONPATH")]))
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import fcn.cli, fcn.train
        import importlib.util
        assert importlib.util.find_spec("torch") is not None  # real or stand-in: there to be kept out
        log = fcn.train.MetricsLog(Path({str(tmp_path)!r}), 0)
        assert log.writer is not None
        log.write(1, {{"loss": 0.5}})
        log.close()
        print(sorted(m for m in ("torch", "tensorflow", "matplotlib") if m in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    # The event file holds the scalar: TFRecord framing (length, crc, Event proto, crc), tag and value inside.
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    records, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        records.append(data[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
    assert any(b"train/loss" in r and struct.pack("<f", 0.5) in r for r in records)


def test_a_fresh_workdir_starts_without_importing_orbax_and_saves_and_resumes_with_it(tmp_path):
    """orbax (0.2-0.3 s to import) is imported at the first save, not before a fresh run's first step;
    a later Checkpoints of the same workdir finds and restores that save."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import jax.numpy as jnp
        import fcn.cli, fcn.train
        from fcn import checkpoint
        workdir = Path({str(tmp_path / "run")!r})
        checkpoint.prepare_workdir(workdir)
        ckpts = checkpoint.Checkpoints(workdir)
        assert ckpts.latest_step() is None
        ckpts.wait()
        before = "orbax" in sys.modules
        state = {{"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(7)}}
        ckpts.save(7, state, mean_iou=0.5)
        ckpts.close()
        again = checkpoint.Checkpoints(workdir)
        back = again.restore(state)
        assert again.latest_step() == 7 and again.best.best_step() == 7
        assert (back["w"] == state["w"]).all() and int(back["step"]) == 7
        again.close()
        print("orbax before the first save:", before)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "orbax before the first save: False"
