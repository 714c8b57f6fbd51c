"""What fcn does on a TPU, simulated on a CPU: jax's backend named "tpu" and a stand-in TPU device.

No TPU has run fcn; these pin the platform branches (docs/benchmarks.md has no TPU figures).
"""

import os
import re
import types

import jax
import numpy as np
import pytest

from configs import camvid, tiny
from fcn import cli, distributed, evaluate, head_loss, host_memory, model, ops, state as state_lib
from fcn.config import ConfigError, validate

TPU = types.SimpleNamespace(
    platform="tpu", device_kind="TPU v4", id=0, memory_stats=lambda: {"bytes_limit": 32 * 2**30, "bytes_in_use": 0}
)

# XLA:TPU's out-of-memory errors: while compiling (most of them: it plans the memory of the whole
# program), and while running (github.com/erfanzar/EasyDeL/issues/166, LargeWorldModel/LWM/issues/60).
TPU_COMPILE_OOM = (
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 63.80G of "
    "30.75G hbm. Exceeded hbm capacity by 33.05G.\n\nTotal hbm usage >= 65.05G:\n    reserved          1.25G\n"
    "    program          63.80G\n    arguments            0B\n\n  Largest program allocations in hbm:\n\n"
    "  1. Size: 2.00G\n     Shape: f32[32,4096,4096]{1,2,0:T(8,128)}\n     Allocation type: HLO temp\n"
)
TPU_RUN_OOM = (
    "RESOURCE_EXHAUSTED: Error allocating device buffer: Attempting to allocate 16.00G. That was not possible. "
    "There are 7.97G free.; (0x0x0_HBM0)"
)


@pytest.fixture
def on_a_tpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")


def test_out_of_memory_on_a_tpu_says_how_much(on_a_tpu):
    """A compilation that does not fit said only 'ran out of memory on the TPU': the size was in
    XLA's 'Used 63.80G of 30.75G hbm', which no pattern read."""
    oom = cli.out_of_memory(jax.errors.JaxRuntimeError(TPU_COMPILE_OOM))
    assert oom == "ran out of memory on the TPU (the program needs 63.80G; it has 30.75G)"
    oom = cli.out_of_memory(jax.errors.JaxRuntimeError(TPU_RUN_OOM))
    assert oom == "ran out of memory on the TPU (it tried to allocate 16.00G)"
    assert cli.out_of_memory(jax.errors.JaxRuntimeError("INVALID_ARGUMENT: Used 1G of 2G hbm")) is None


def test_every_platform_branch_takes_the_accelerator_path_on_a_tpu(on_a_tpu):
    """None of the CPU's choices (oneDNN, compiler options, barriers, pacing, two evaluations at once)
    and none of the GPU's (the fused head's Triton kernel) applies on a TPU."""
    for config in (tiny.get_config(), camvid.get_config()):
        validate(config)  # camvid: bfloat16, native on a TPU, with no warning about oneDNN
        assert head_loss.fused_head_mode(config, TPU) is None  # "auto": measured on Hopper GPUs only
    config = tiny.get_config()
    config.model.conv_impl = "onednn"
    with pytest.raises(ConfigError, match="conv_impl='onednn' runs on a CPU; this backend is tpu: use auto"):
        validate(config)
    assert ops.train_compiler_options("auto") is None and model.run_once_compiler_options() is None
    assert evaluate.batches_in_flight() == 1 and not host_memory.one_step_at_a_time([TPU])
    assert state_lib.memory_limit(TPU) == (32 * 2**30, "TPU's memory")


def test_the_training_step_traced_for_a_tpu_has_no_custom_calls(on_a_tpu):
    """XLA's own convolutions and matrix products ('auto' is 'gemm' off the CPU): no oneDNN call, no
    Triton kernel, no CPU-only optimization barrier."""
    config = tiny.get_config()
    config.model.dtype = "bfloat16"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 24, 32, 3), np.uint8)
    labels = rng.integers(0, 4, (4, 24, 32), np.uint8)
    sizes = np.array([(24, 32)] * 4, np.int32)
    # The state's shapes are all that lowering needs: computing it took most of the test, its initialiser
    # compiled with a TPU's options (LLVM's optimisation on) by this CPU.
    graphs, state, tx = state_lib.abstract_state(config, 4)
    text = state_lib.jit_train_step(config, graphs, tx, 4, 255).lower(state, images, labels, sizes).as_text()
    assert re.findall(r"custom_call @[\w$.]+", text) == []
    assert text.count("optimization_barrier") == 0


def test_a_cloud_tpu_is_found_as_a_cluster(monkeypatch):
    """A TPU VM (libtpu installed, TPU chips present) or a GKE TPU pod's variables: jax.distributed.initialize()
    with no arguments, which reads the slice from the metadata server (docs/distributed.md)."""
    for name in [*os.environ]:
        if name.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "FCN_DISTRIBUTED")):
            monkeypatch.delenv(name)
    chips, libtpu = [], None
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [p for p in chips if p.startswith(pattern[:9])])
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: libtpu if name == "libtpu" else None)
    assert distributed.detect_cluster() is None
    libtpu = object()  # installed on a machine without TPU chips: no cluster
    assert distributed.detect_cluster() is None
    for chips in (["/dev/accel0"], ["/dev/vfio/0"]):  # TPU v4's chips, and v5e's or v6e's
        assert distributed.detect_cluster() == "tpu", chips
    monkeypatch.setenv("FCN_DISTRIBUTED", "0")
    assert distributed.detect_cluster() is None
    monkeypatch.delenv("FCN_DISTRIBUTED")
    chips, libtpu = [], None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")  # a GKE TPU pod
    assert distributed.detect_cluster() == "tpu"
