"""A model whose state alone is larger than the device's memory is refused before anything is made.

`--config.model.depth=12 --config.model.features=32` on configs/tiny.py (one 576 GiB kernel) created
its state on a CPU and then waited forever reading it (jaxlib 0.10.2), every thread idle.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from configs import tiny
from fcn import state as state_lib
from fcn.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HUGE = ["--config.model.depth=12", "--config.model.features=32"]


def test_a_state_larger_than_memory_is_one_error_line_at_once(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config=configs/tiny.py", "--workdir", str(workdir), *HUGE]
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120
    )
    took = time.perf_counter() - t0
    assert done.returncode == 1, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in (
        "the model's state alone needs 5.56 TiB (parameters 1.85 TiB,",
        "config.model.features=32 and config.model.depth=12: nothing was created. The state would fit with",
    ):
        assert needle in lines[0], lines[0]
    # The deepest network at width 32 and the widest at depth 12 whose state fits this machine's memory.
    depth = int(re.search(r"--config\.model\.depth=(\d+) \(now 12\)", lines[0])[1])
    features = int(re.search(r"--config\.model\.features=(\d+) \(now 32\)", lines[0])[1])
    limit = state_lib.memory_limit()[0]

    def need(**model) -> int:
        config = tiny.get_config()
        config.model.update(model)
        return state_lib.state_bytes(jax.eval_shape(state_lib._initialiser(config, 4)[0]))

    assert need(features=32, depth=depth) <= limit < need(features=32, depth=depth + 1)
    assert need(features=features, depth=12) <= limit < need(features=2 * features, depth=12)
    assert "more than the host's physical memory" in lines[0] or "cgroup's memory limit" in lines[0], lines[0]
    assert not workdir.exists()  # nothing written: no config.json, no empty folder
    assert took < 60, took  # the process's start and the data: seconds, never a wait


def test_the_size_is_the_created_state_and_the_check_compares_it_with_the_limit(monkeypatch):
    config = tiny.get_config()
    config.optimizer.ema_decay = 0.99  # every part of the state: parameters, Adam's moments, statistics, EMA
    _, shapes, _ = state_lib.abstract_state(config, 4)  # fits: a few hundred KiB
    _, state, _ = state_lib.create(config, 4)
    need = state_lib.state_bytes(shapes)
    assert need == sum(x.nbytes for x in jax.tree.leaves(state)) > 4 * state_lib.state_bytes(state["params"])

    monkeypatch.setattr(state_lib, "memory_limit", lambda device=None: (need, "test device's memory"))
    state_lib.abstract_state(config, 4)  # exactly the limit: fits (activations are not guessed at)
    monkeypatch.setattr(state_lib, "memory_limit", lambda device=None: (need - 1, "test device's memory"))
    with pytest.raises(ConfigError) as e:
        state_lib.abstract_state(config, 4)
    message = str(e.value)
    assert f"needs {need / 1024:.3g} KiB" in message and "more than the test device's memory (" in message
    assert "config.model.features=4 and config.model.depth=2" in message
    assert "The state would fit with --config.model.depth=1 (now 2) or --config.model.features=2 (now 4)" in message
    monkeypatch.setattr(state_lib, "memory_limit", lambda device=None: (None, ""))  # a backend that does not say
    state_lib.abstract_state(config, 4)


def test_loading_a_workdir_whose_state_cannot_fit_says_so_before_restoring(tmp_path):
    """fcn.load (fcn.predict, fcn.export) and fcn.evaluate check it too, before any checkpoint is read."""
    from fcn import load, trained

    config = tiny.get_config()
    config.model.depth, config.model.features = 12, 32
    (tmp_path / "config.json").write_text(config.to_json())
    info = {"source": "synthetic", "class_names": ["a", "b", "c"], "palette": [[0, 0, 0]] * 3, "ignore_label": 255}
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    before = sorted(tmp_path.iterdir())
    for loader in (load, trained.restore):  # fcn.load, and fcn.evaluate's reader
        with pytest.raises(ConfigError, match=f"{tmp_path}'s checkpoints cannot be restored on this machine"):
            loader(tmp_path)
    assert sorted(tmp_path.iterdir()) == before
