"""The shell entry points parse, the GPU script refuses an unknown task by name, and benchmarks answer --help."""

import subprocess
import sys
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


@pytest.mark.parametrize("script", ["benchmarks/conv_threads.py", "benchmarks/notebook_start.py"])
def test_benchmarks_without_flags_answer_help(script):
    """They took no flags and ran the whole benchmark on --help (6-7 s of timing, no usage)."""
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage:") and "Not a test." in done.stdout, done.stderr
    done = subprocess.run([sys.executable, script, "--batch", "4"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unrecognized arguments: --batch 4" in done.stderr


def _wheel(path: Path, name: str, version: str, init: str) -> None:
    """A minimal pure-Python wheel of package `name` whose __init__ is `init`."""
    import zipfile

    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": init,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for f, text in files.items():
            z.writestr(f, text)


def _source_gpu_env(cwd: Path, then: str, **env) -> subprocess.CompletedProcess:
    import sys

    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "FCN_SITE": str(cwd / "site"), **env}
    done = subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source {ROOT}/scripts/gpu_env.sh; {then}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_gpu_env_drops_carried_flax_that_breaks_fcn(tmp_path):
    """A carried flax that fcn cannot import with (say, against a newer jax) gives way to the machine's own."""
    from importlib.metadata import version

    (tmp_path / "wheels").mkdir()
    _wheel(tmp_path / "wheels", "flax", "99.0", "raise ImportError('flax 99 needs another jax')\n")
    (tmp_path / "fcn").symlink_to(ROOT / "fcn")
    done = _source_gpu_env(tmp_path, "echo PYTHONPATH=$PYTHONPATH", OUT=str(tmp_path / "out"))
    assert "does not import with the carried flax/orbax (ImportError: flax 99 needs another jax)" in done.stderr
    assert f"flax {version('flax')} |" in done.stdout  # the environment's own, not 99.0
    assert not list((tmp_path / "site").glob("flax*"))


def test_gpu_env_carries_xla_autotuning_results_to_the_next_call(tmp_path):
    """A call's autotuning results come back in $OUT/autotune.tgz; unpacked into autotune/, they seed the
    next call's cache, but only when made with the same jaxlib, CUDA plugin, cuDNN and device."""
    import tarfile

    first = _source_gpu_env(
        tmp_path,
        'echo algo > "$FCN_AUTOTUNE_DIR/0a1b.textproto"',  # as XLA would write one
        OUT=str(tmp_path / "out1"),
        FCN_JAX_CACHE=str(tmp_path / "cache1"),
    )
    assert "seeded" not in first.stdout
    with tarfile.open(tmp_path / "out1" / "autotune.tgz") as t:
        t.extractall(tmp_path / "autotune", filter="data")
    assert sorted(p.name for p in (tmp_path / "autotune").iterdir()) == ["0a1b.textproto", "KEY"]

    second = _source_gpu_env(
        tmp_path,
        'cat "$FCN_AUTOTUNE_DIR/0a1b.textproto"; ls "$FCN_AUTOTUNE_DIR"',
        OUT=str(tmp_path / "out2"),
        FCN_JAX_CACHE=str(tmp_path / "cache2"),
    )
    assert "XLA autotuning results: 1 seeded from autotune/" in second.stdout
    assert second.stdout.splitlines()[-2:] == ["algo", "0a1b.textproto"]  # the key stays out of XLA's folder

    (tmp_path / "autotune" / "KEY").write_text("jaxlib==0.1 another_GPU\n")
    third = _source_gpu_env(
        tmp_path, 'ls "$FCN_AUTOTUNE_DIR" | wc -l', OUT=str(tmp_path / "out3"), FCN_JAX_CACHE=str(tmp_path / "cache3")
    )
    assert "autotune/ was made with jaxlib==0.1 another_GPU, not jaxlib==" in third.stdout
    assert third.stdout.splitlines()[-1].strip() == "0" and not (tmp_path / "out3" / "autotune.tgz").exists()


def test_the_readme_writes_head_loss_kernel_settings_as_the_script_reads_them():
    """benchmarks/README.md said `--kernels BLOCKxWARPS,...`; head_loss.py reads SUBxWARPSxSTEPSxSTAGES."""
    import re

    (form,) = re.findall(r"`--kernels (\S+),\.\.\.`", (ROOT / "benchmarks" / "README.md").read_text())
    source = (ROOT / "benchmarks" / "head_loss.py").read_text()
    assert f"the kernel's settings, {form},..." in source
    assert len(form.split("x")) == 4  # parse_setting's sub, warps, steps, stages
