"""Same config, same seed, same machine: the same numbers, bit for bit (on CPU; see docs/reproducibility.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from fcn import checkpoint, state as state_lib
from fcn.evaluate import format_report
from fcn.train import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]


def train_in_a_new_process(workdir: Path) -> str:
    """`python train.py --config configs/tiny.py` on the CPU."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


EVAL_KEYS = ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou")


def logged_numbers(workdir) -> list[dict]:
    """metrics.jsonl without the throughput, the one entry that measures time."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "images_per_sec"} for ln in lines]


def final_params(workdir):
    _, abstract, _ = state_lib.abstract_state(checkpoint.load_config(workdir), 4)
    ckpts = checkpoint.Checkpoints(workdir)
    try:
        return jax.tree.leaves(ckpts.restore(abstract)["params"])
    finally:
        ckpts.close()


def test_two_runs_with_one_seed_give_identical_losses_metrics_and_weights(tmp_path):
    """Two fresh runs of the tiny config, one in this process and one from the command line: every
    logged loss, gradient norm and eval metric, the final report and every final weight are equal,
    not merely close."""
    if jax.default_backend() != "cpu":
        pytest.skip("bit-reproducibility is promised on CPU; GPU needs XLA_FLAGS=--xla_gpu_deterministic_ops=true")
    config = tiny.get_config()
    report = train_and_evaluate(config, tmp_path / "a")
    printed = train_in_a_new_process(tmp_path / "b")
    assert format_report(report) in printed  # the same final table, to the last digit shown
    assert logged_numbers(tmp_path / "a")[-1] == {"step": 6, **{f"eval_{k}": report[k] for k in EVAL_KEYS}}
    numbers = logged_numbers(tmp_path / "a")
    assert numbers == logged_numbers(tmp_path / "b")
    assert len({n["loss"] for n in numbers if "loss" in n}) == config.num_steps  # real numbers, not a constant
    for x, y in zip(final_params(tmp_path / "a"), final_params(tmp_path / "b"), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
