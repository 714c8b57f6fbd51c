"""benchmarks/fused_model.py: fcn's whole training step with benchmarks/fused_block.py's block in its
conv blocks (the kernels interpreted on the CPU) equals fcn's own step; the variant's spec."""

import argparse
import functools

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE

from benchmarks import common, fused_model
from benchmarks.gpu_target import abstract_gpu
from fcn import state as state_lib
from fcn.model import ConvBlock

ARGS = dict(batch=2, size=(16, 16), features=16, depth=1, classes=11, conv_impl="gemm", dtype="float32")


@pytest.fixture(scope="module", autouse=True)
def _compiled_fast():
    with pytest.MonkeyPatch.context() as mp:
        fast_step = functools.partial(state_lib.jit_train_step, compiler_options=FAST_COMPILE)
        mp.setattr(state_lib, "jit_train_step", fast_step)
        yield


@pytest.fixture(scope="module")
def fcns_step(_compiled_fast):
    """fcn's own step with ARGS, run once for the module: (new state's leaves, outputs)."""
    return _step()


def _step(**overrides):
    """fcn's training step, built and run once in this context: (new state's leaves, outputs)."""
    step, state, batch = common.fcn_train_step(argparse.Namespace(**{**ARGS, **overrides}))
    new, out = step(state, *batch)
    return [x for x in jax.tree.leaves(new) if x.dtype != jax.dtypes.float0], out


@pytest.mark.parametrize("spec", ["64x16x16", "64x16x16:conv1:dgrad"])
def test_training_step_with_fused_blocks_equals_fcns(spec, fcns_step):
    want, out_want = fcns_step
    fused = []
    with fused_model.patched(spec, fused):
        got, out_got = _step()
    assert ConvBlock.__call__ is not None and "patched" not in ConvBlock.__call__.__qualname__  # restored
    assert fused == [16, 32, 16]  # down0, bottom, up0: every block went through fused_block
    assert abs(float(out_got["loss"]) - float(out_want["loss"])) < 1e-5
    assert len(got) == len(want)  # parameters, optimizer state and batch norm's running averages
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-4, atol=1e-6)


def test_blocks_it_cannot_fuse_run_as_fcns():
    fused = []
    with fused_model.patched("64x64x16", fused):  # 24 and 48 channels: no power-of-two block divides them
        _step(features=24)
    assert fused == []


def test_spec_parsing():
    s1, s2 = dict(bm=128, bn=64, bk=32, num_warps=4, num_stages=3), dict(bm=64, bn=32, bk=16)
    assert fused_model.parse("128x64x32x4x3:conv1:head") == ({None: s1}, {"conv1", "head"})
    assert fused_model.parse("128x64x32x4x3/512@64x32x16") == ({None: s1, 512: s2}, set())
    assert fused_model.parse("512@64x32x16:dgrad") == ({512: s2}, {"dgrad"})
    bad_parts = [("128x64", "'128x64'"), ("128x64x32:dgrd", "'dgrd'"), ("big:conv1", "'big'"),
                 ("64x32x16/w@64x32x16", "'w@64x32x16'"), ("32@64x32x16/32@64x32x16", "'32@64x32x16'")]  # fmt: skip
    for bad, part in bad_parts:
        with pytest.raises(ValueError, match=f"fused spec .*{part}"):
            fused_model.parse(bad)


def test_settings_by_width():
    fused = []
    with fused_model.patched("32@64x16x16", fused):  # only the bottom block (32 channels) has a setting
        _step()
    assert fused == [32]


def test_default_network_step_lowers_for_a_gpu_with_every_block_fused():
    """What benchmarks/run_gpu.sh's variant builds (bfloat16, the default network), lowered for CUDA
    here: 9 blocks by fused_block, 6 Triton calls each but down0's conv1 (3 channels in: XLA's)."""
    args = argparse.Namespace(**{**ARGS, "size": (32, 48), "features": 32, "depth": 4, "dtype": "bfloat16"})
    fused = []
    with fused_model.patched("128x64x32x4x3:conv1:dgrad", fused, interpret=False):
        step, state, batch = common.fcn_train_step(args)
        with abstract_gpu():
            text = step.trace(state, *batch).lower(lowering_platforms=("cuda",)).as_text()
    assert fused == [32, 64, 128, 256, 512, 256, 128, 64, 32]
    assert text.count("__gpu$xla.gpu.triton") == 9 * 6 - 3
