"""What fcn does on a TPU, simulated on a CPU: jax's backend named "tpu" and a stand-in TPU device.

No TPU has run fcn; these pin the platform branches (docs/benchmarks.md has no TPU figures).
"""

import jax
import pytest

from fcn import cli

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
