"""benchmarks/fused_block.py: a whole ConvBlock's training, forward and backward, with the prototype conv
kernels in it (interpreted on the CPU), against fcn's own ConvBlock; the list of the network's blocks
against fcn's model; its lowering for a GPU; the benchmark end to end."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE
from flax import nnx

from benchmarks import conv_kernels, fused_block, fused_conv
from benchmarks.gpu_target import abstract_gpu
from fcn import model as model_lib

SETTING = dict(bm=64, bn=16, bk=16)  # 2 x 6 x 10 = 120 pixels: a partial second block; 2 channel blocks


def _case(dtype, seed=1):
    """fcn's ConvBlock 16 -> 32 (batch norm's scale and bias at random), its parameters, x and an output gradient."""
    block = fused_block.conv_block(16, 32, dtype)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, 6, 10, 16)), dtype)
    g = jnp.asarray(rng.normal(size=(2, 6, 10, 32)), dtype)
    return block, nnx.split(block, nnx.Param, ...)[1], x, g


def _run(block, params, x, g, first_kernel, dgrad_kernel, compiler_options=None):
    """(fcn's (output, x's gradient, parameters' gradients, running statistics after the step),
    the fused block's) as fused_block's dicts."""
    jit = {"compiler_options": {**FAST_COMPILE, **(compiler_options or {})}}
    out, new_stats, (grads, dx) = jax.jit(fused_block.reference_grad(block, True), **jit)(params, x, g)
    want = (out, dx, fused_block.block_params(grads), jax.tree.leaves(new_stats))
    eps = fused_block.block_epsilon(block)
    fn = fused_block.fused_grad(True, eps=eps, first_kernel=first_kernel, setting=SETTING, dgrad_kernel=dgrad_kernel)
    out, stats, (grads, dx) = jax.jit(fn, **jit)(fused_block.block_params(params), x, g)
    updated = nnx.clone(block)
    fused_block.update_stats(updated, stats)  # the running averages as fcn's batch norm updates them
    return want, (out, dx, grads, jax.tree.leaves(nnx.state(updated, nnx.BatchStat)))


KERNELS = [(False, False), (True, False), (False, True), (True, True)]  # (first_kernel, dgrad_kernel)


@pytest.mark.parametrize("first_kernel, dgrad_kernel", KERNELS)
def test_float32_block_equals_fcns_convblock(first_kernel, dgrad_kernel):
    block, params, x, g = _case(jnp.float32)
    (out_r, dx_r, grads_r, stats_r), (out_f, dx_f, grads_f, stats_f) = _run(
        block, params, x, g, first_kernel, dgrad_kernel
    )
    assert out_f.dtype == dx_f.dtype == jnp.float32 and out_f.shape == (2, 6, 10, 32)
    assert fused_conv.relative(out_f, out_r) < 1e-5
    assert fused_conv.relative(dx_f, dx_r) < 1e-5
    assert sorted(grads_f) == sorted(fused_block.PARAMS)
    for k in fused_block.PARAMS:
        assert grads_f[k].dtype == jnp.float32 and grads_f[k].shape == grads_r[k].shape, k
        assert fused_conv.relative(grads_f[k], grads_r[k]) < 1e-5, k
        assert float(jnp.max(jnp.abs(grads_r[k]))) > 1e-3, k  # a gradient that says something
    assert len(stats_f) == 4
    for a, b in zip(stats_f, stats_r):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first_kernel, dgrad_kernel", KERNELS)
def test_bfloat16_block_equals_fcns_to_rounding(first_kernel, dgrad_kernel):
    # XLA:CPU keeps its own bfloat16 conv outputs unrounded where it reads them again (excess precision),
    # the kernels' are rounded, and a ReLU mask flipped by one rounding moves a gradient by a whole
    # element of g: compared with that off, as bfloat16 strictly computes them.
    block, params, x, g = _case(jnp.bfloat16)
    strict = {"xla_allow_excess_precision": False}
    (out_r, dx_r, grads_r, stats_r), (out_f, dx_f, grads_f, stats_f) = _run(
        block, params, x, g, first_kernel, dgrad_kernel, strict
    )
    assert out_f.dtype == dx_f.dtype == jnp.bfloat16
    for got, want in [(out_f, out_r), (dx_f, dx_r), *((grads_f[k], grads_r[k]) for k in fused_block.PARAMS)]:
        assert got.dtype == want.dtype  # the parameters' gradients in float32, rounded to bfloat16 as fcn's
        assert fused_conv.relative(got, want) <= 2**-8  # one rounding at most (the kernels sum in another order)
    for a, b in zip(stats_f, stats_r):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_refuses_what_it_does_not_compute():
    block, params, x, _ = _case(jnp.float32)
    with pytest.raises(ValueError, match="does not fit conv2's 32 channels"):
        fused_block.fused_block(
            fused_block.block_params(params), x, eps=1e-5, first_kernel=False, setting=dict(bn=8, bk=8)
        )
    assert fused_block.block_epsilon(block) == 1e-5
    narrow = model_lib.ConvBlock(16, 32, norm="batch", bottleneck=4, dtype=jnp.float32, conv=nnx.Conv, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="bottleneck"):
        fused_block.block_epsilon(narrow)
    grouped = model_lib.ConvBlock(
        16, 32, norm="group", bottleneck=0, dtype=jnp.float32, conv=nnx.Conv, rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match="model.norm='group'"):
        fused_block.block_epsilon(grouped)


def test_the_list_of_blocks_is_the_models():
    blocks = fused_block.network_blocks(2, (20, 30), 16, 2)
    assert blocks == [
        ("down0", (2, 20, 32, 3), 16),
        ("down1", (2, 10, 16, 16), 32),
        ("bottom", (2, 5, 8, 32), 64),
        ("up1", (2, 10, 16, 64), 32),
        ("up0", (2, 20, 32, 32), 16),
    ]
    net = model_lib.UNet(in_channels=3, num_classes=5, features=16, depth=2, rngs=nnx.Rngs(0))
    modules = [*net.down, net.bottom, *net.up_blocks]
    assert [b.convs[0].kernel.shape[2:] for b in modules] == [(shape[-1], c_out) for _, shape, c_out in blocks]
    # each block's second conv is at the size conv_kernels.network_convs gives it (checked against the model there)
    sizes = {name.split()[0]: shape[:3] for name, shape, _, bn in conv_kernels.network_convs(2, (20, 30), 16, 2) if bn}
    assert {name: shape[:3] for name, shape, _ in blocks} == sizes


def test_lowers_to_triton_kernels_for_a_gpu():
    """Conv2's forward and weight gradient, with first_kernel conv1's, and with dgrad_kernel the input gradients
    (conv1's with first_kernel), are Triton calls (no GPU needed)."""
    block = fused_block.conv_block(64, 64, jnp.bfloat16)
    params = fused_block.block_params(nnx.split(block, nnx.Param, ...)[1])
    x = jax.ShapeDtypeStruct((2, 8, 8, 64), jnp.bfloat16)
    for (first, dgrad), calls in zip(KERNELS, (2, 4, 3, 6)):
        setting = dict(bm=64, bn=64, bk=32)
        fn = fused_block.fused_grad(
            True, eps=1e-5, first_kernel=first, setting=setting, dgrad_kernel=dgrad, interpret=False
        )
        with abstract_gpu():
            text = jax.jit(fn).trace(params, x, x).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == calls, (first, dgrad)


def test_runs_end_to_end_on_a_tiny_network(capsys, monkeypatch):
    # the benchmark's own jax.jit calls compiled as FAST_COMPILE (10 fused variants, each compiled once)
    monkeypatch.setattr(jax, "jit", functools.partial(jax.jit, compiler_options=FAST_COMPILE))
    fused_block.main(["--batch", "1", "--size", "8", "8", "--features", "16", "--depth", "1", "--rounds", "1",
                      "--steps", "1", "--kernels", "64x16x16x4x3"])  # fmt: skip
    out = capsys.readouterr().out
    assert "the kernels interpreted: values, not speed" in out
    compared = re.findall(r"^(\w+) \(.*?, (\S+(?: \+conv1)?(?: \+dgrad)?): relative to the largest: (.*)$", out, re.M)
    # down0's conv1 (3 channels in) is XLA's either way; bottom and up0 run with and without conv1's kernel
    s, s1 = "64x16x16x4x3", "64x16x16x4x3 +conv1"
    assert [(name, label) for name, label, _ in compared] == [
        ("down0", s),
        ("down0", f"{s} +dgrad"),
        *((name, label) for name in ("bottom", "up0") for label in (s, s1, f"{s} +dgrad", f"{s1} +dgrad")),
    ]
    for name, _, diffs in compared:
        values = dict(item.rsplit(" ", 1) for item in diffs.split(", "))
        assert ("x" in values) == (name != "down0") and max(map(float, values.values())) < 1e-5, diffs
    assert re.findall(r"^(down0|bottom|up0) {2,}\(", out, re.M) == ["down0", "bottom", "up0"]
    assert re.search(r"^total: XLA \S+ ms, fused \S+ ms: [+-]\S+ ms a step saved .* the 2.6 ms", out, re.M)
