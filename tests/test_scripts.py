"""The shell entry points parse, and the GPU script refuses an unknown task by name."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.relative_to(ROOT) for p in [*ROOT.glob("scripts/*.sh"), *ROOT.glob("benchmarks/*.sh")])


@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_shell_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_script_names_what_it_runs():
    assert Path("scripts/run_gpu.sh") in SCRIPTS and Path("scripts/gpu_env.sh") in SCRIPTS
    done = subprocess.run(["bash", "scripts/run_gpu.sh"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "camvid|ablation" in done.stderr
    done = subprocess.run(["bash", "scripts/run_gpu.sh", "camvd"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown: camvd (camvid or ablation)" in done.stderr
    assert "jax" not in done.stdout  # refused before setting up the environment
