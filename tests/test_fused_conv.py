"""The prototype conv kernels of benchmarks/conv_kernels.py (a 3x3 conv with batch norm + ReLU on its
input and batch norm's sums of its output; its weight gradient; its input gradient with batch norm's
gradient's sums), interpreted on the CPU, against
XLA's conv, its gradient and fcn.norm; the list of the network's convs against fcn's model; their
lowering for a GPU; benchmarks/fused_conv.py end to end."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE
from flax import nnx

from benchmarks import conv_kernels, fused_conv
from benchmarks.gpu_target import abstract_gpu
from fcn import model as model_lib, norm


def _case(shape, c_out, dtype=jnp.float32, seed=0):
    """x, weights, batch norm's (mean, mul, bias), an output gradient."""
    return fused_conv._inputs(shape, c_out, dtype, np.random.default_rng(seed))


@pytest.mark.parametrize("bn", [False, True])
def test_conv_and_sums_match_xla_at_the_image_edges_and_a_partial_last_block(bn):
    # 2 x 5 x 7 = 70 pixels in blocks of 64: the second block is mostly past the end; every tap of
    # a 5 x 7 image reaches over an edge somewhere. Two input chunks of 16 channels, two output blocks.
    x, w, stats, _ = _case((2, 5, 7, 32), 32)
    stats = stats if bn else None
    y, sums = conv_kernels.conv3x3(x, w, stats, bm=64, bn=16, bk=16)
    a = x if stats is None else jax.nn.relu((x - stats[0]) * stats[1] + stats[2])
    want = jax.lax.conv_general_dilated(
        a, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    y64 = np.asarray(want, np.float64).reshape(-1, 32)
    np.testing.assert_allclose(sums, np.stack([y64.sum(0), (y64**2).sum(0)]), rtol=1e-5, atol=1e-4)
    mean, var = conv_kernels.stats_from_sums(sums, 70)
    np.testing.assert_allclose(mean, y64.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, y64.var(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bn", [False, True])
def test_weight_gradient_matches_xlas_over_shares_of_the_pixels(bn):
    # 70 pixels in steps of 16: 5 blocks in shares of 2 steps (the grid has 9 x 2 x 2 = 36 instances
    # before the shares), the last share half past the end; batch norm + ReLU taken in as the forward does.
    x, w, stats, g = _case((2, 5, 7, 32), 32)
    stats = stats if bn else None
    assert conv_kernels.wgrad_shares(70, 16, 36, least=96) == (3, 2)
    a = x if stats is None else fused_conv.bn_relu(x, stats)
    want = jax.vjp(lambda w: jax.lax.conv_general_dilated(
        a, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"), w)[1](g)[0]  # fmt: skip
    got = conv_kernels.conv3x3_wgrad(x, g, stats, bm=16, bn=16, bk=16)
    assert got.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bn", [False, True])
def test_input_gradient_matches_xlas_and_on_through_batch_norm_and_relu(bn):
    # The gradient at y1 of conv(relu(batch norm(y1))) with y1's own batch statistics, as jax
    # differentiates fcn.norm._bn_relu: the kernel's masked output and two sums, then
    # fcn.norm.bn_grad_from_sums. 70 pixels in blocks of 64, 32 -> 16 channels back in blocks of 16.
    y1, w, _, g = _case((2, 5, 7, 16), 32)
    scale, bias, eps = jnp.linspace(0.5, 1.5, 16), jnp.linspace(-0.5, 0.5, 16), 1e-5

    def conv(a):
        return jax.lax.conv_general_dilated(a, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision="highest")  # fmt: skip

    if not bn:
        want = jax.vjp(conv, y1)[1](g)[0]
        got, sums = conv_kernels.conv3x3_dgrad(g, w, bm=64, bn=16, bk=16)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sums, [np.sum(want, (0, 1, 2)), np.sum(np.square(want), (0, 1, 2))], rtol=1e-4)
        return
    want = jax.vjp(lambda y: conv(norm._bn_relu(y, scale, bias, eps, jnp.float32)[0]), y1)[1](g)[0]
    mean, var = norm.batch_stats(y1)
    inv = jax.lax.rsqrt(var + eps)
    d, sums = conv_kernels.conv3x3_dgrad(g, w, (y1, mean, inv * scale, bias), bm=64, bn=16, bk=16)
    assert float(jnp.mean(d == 0)) > 0.2  # the ReLU's zeros are there to mask
    got = norm.bn_grad_from_sums(y1, d, mean, inv, scale, sums[0], sums[1])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shares_cover_the_pixels_and_fill_the_grid():
    for pixels, bm, instances in [(16 * 368 * 480, 128, 9), (16 * 23 * 30, 64, 9 * 16 * 8), (70, 64, 36), (1, 16, 4)]:
        shares, steps = conv_kernels.wgrad_shares(pixels, bm, instances)
        blocks = -(-pixels // bm)
        assert (shares - 1) * steps < blocks <= shares * steps  # every block once, no share empty
        assert shares * instances >= 1024 or shares == blocks


def test_bfloat16_layer_matches_xlas_to_rounding():
    x, w, stats, _ = _case((2, 8, 8, 16), 32, jnp.bfloat16)
    (y_f, (m_f, v_f)), (y_r, (m_r, v_r)) = (
        fused_conv.fused_layer(x, w, stats, bm=64, bn=32, bk=16),
        jax.jit(fused_conv.xla_layer)(x, w, stats),
    )
    assert y_f.dtype == jnp.bfloat16
    y_f, y_r = np.asarray(y_f, np.float32), np.asarray(y_r, np.float32)
    assert np.max(np.abs(y_f - y_r)) <= 2**-7 * np.max(np.abs(y_r))  # bfloat16's rounding, accumulated in f32
    # XLA may take its statistics from the conv's output before rounding it (excess precision).
    np.testing.assert_allclose(m_f, m_r, atol=2e-3)
    np.testing.assert_allclose(v_f, v_r, rtol=1e-2, atol=2e-3)


def test_channel_blocks_are_cut_to_the_conv_or_refused():
    setting = conv_kernels.parse_setting("128x64x32x4x3")
    assert setting == dict(bm=128, bn=64, bk=32, num_warps=4, num_stages=3)
    assert conv_kernels.describe(setting) == "128x64x32x4x3"
    assert conv_kernels.fits(16, 32, setting) == dict(setting, bn=32, bk=16)
    assert conv_kernels.fits(8, 32, setting) is None  # Triton's products need 16 channels a side
    assert conv_kernels.fits(48, 32, setting) is None  # 48 is no multiple of a power-of-two block of 32
    x, w, _, g = _case((1, 4, 4, 8), 32)
    with pytest.raises(ValueError, match="channels 8 -> 32"):
        conv_kernels.conv3x3(x, w)
    with pytest.raises(ValueError, match="channels 8 -> 32"):
        conv_kernels.conv3x3_wgrad(x, g)


def test_the_list_of_convs_is_the_models():
    """Every 3x3 conv of fcn's U-Net with 16 input channels or more, in order, at the padded size."""
    convs = conv_kernels.network_convs(2, (20, 30), 16, 2)
    assert [(name, shape, c_out, bn) for name, shape, c_out, bn in convs] == [
        ("down0 conv2", (2, 20, 32, 16), 16, True),
        ("down1 conv1", (2, 10, 16, 16), 32, False),
        ("down1 conv2", (2, 10, 16, 32), 32, True),
        ("bottom conv1", (2, 5, 8, 32), 64, False),
        ("bottom conv2", (2, 5, 8, 64), 64, True),
        ("up1 conv1", (2, 10, 16, 64), 32, False),
        ("up1 conv2", (2, 10, 16, 32), 32, True),
        ("up0 conv1", (2, 20, 32, 32), 16, False),
        ("up0 conv2", (2, 20, 32, 16), 16, True),
    ]
    net = model_lib.UNet(in_channels=3, num_classes=5, features=16, depth=2, rngs=nnx.Rngs(0))
    modules = [m for _, m in nnx.iter_graph(net) if isinstance(m, nnx.Conv)]
    kernels = sorted(m.kernel.shape[2:] for m in modules if m.kernel.shape[:2] == (3, 3) and m.kernel.shape[2] >= 16)
    assert kernels == sorted((shape[-1], c_out) for _, shape, c_out, _ in convs)


def test_lowers_to_one_triton_kernel_for_a_gpu():
    """Every operation has a Triton lowering (checked without a GPU; compiling needs one)."""
    x = jax.ShapeDtypeStruct((16, 23, 30, 512), jnp.bfloat16)  # 11040 pixels: a partial last block
    w = jax.ShapeDtypeStruct((3, 3, 512, 512), jnp.float32)
    for bn in (False, True):
        stats = tuple(jax.ShapeDtypeStruct((512,), jnp.float32) for _ in range(3)) if bn else None
        fn = jax.jit(lambda x, w, s: fused_conv.fused_layer(x, w, s, bm=128, bn=128, bk=32, interpret=False))
        with abstract_gpu():
            text = fn.trace(x, w, stats).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1, bn
        assert "grid_x = 87" in text and "grid_y = 4" in text  # ceil(11040 / 128) blocks, 512 / 128
        wgrad = jax.jit(lambda x, g, s: conv_kernels.conv3x3_wgrad(x, g, s, bm=64, bn=128, bk=64, interpret=False))
        with abstract_gpu():
            text = wgrad.trace(x, x, stats).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1, bn
        # 9 taps x 8 chunks, 4 channel blocks, and 4 shares of the pixels: 1024 instances or more
        assert "grid_x = 72" in text and "grid_y = 4" in text and "grid_z = 4" in text
        dgrad = jax.jit(lambda g, w, x, s: conv_kernels.conv3x3_dgrad(g, w, s and (x, *s), bm=128, bn=64, bk=64,
                                                                      interpret=False))  # fmt: skip
        with abstract_gpu():
            text = dgrad.trace(x, w, x, stats).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1, bn
        assert "grid_x = 87" in text and "grid_y = 8" in text  # 512 / 64 channels back


def test_convs_can_be_chosen_by_name(capsys, monkeypatch):
    monkeypatch.setattr(jax, "jit", functools.partial(jax.jit, compiler_options=FAST_COMPILE))
    fused_conv.main(["--batch", "1", "--size", "8", "8", "--features", "16", "--depth", "1", "--rounds", "1",
                     "--steps", "1", "--kernels", "64x32x16x4x3", "--convs", "^up0 conv2$"])  # fmt: skip
    out = capsys.readouterr().out
    assert re.findall(r"^(\w+ conv\d) \(", out, re.M) == ["up0 conv2"]
    # its values compared, its times as soon as they are taken, and one line in each of the four tables
    assert out.count("\nup0 conv2 ") == 6


def test_runs_end_to_end_on_a_tiny_network(capsys, monkeypatch):
    monkeypatch.setattr(jax, "jit", functools.partial(jax.jit, compiler_options=FAST_COMPILE))
    fused_conv.main(["--batch", "1", "--size", "8", "8", "--features", "16", "--depth", "1", "--rounds", "1",
                     "--steps", "1", "--kernels", "64x32x16x4x3"])  # fmt: skip
    out = capsys.readouterr().out
    assert "the kernel interpreted: values, not speed" in out
    diffs = [float(d) for d in re.findall(r"output (\S+) of its largest", out)]
    assert len(diffs) == 5 and max(diffs) < 1e-5, out  # the network's five convs with 16 channels or more
    wgrads = [float(d) for d in re.findall(r"weight gradient (\S+);", out, re.M)]
    assert len(wgrads) == 5 and max(wgrads) < 1e-5, out
    dgrads = [float(d) for d in re.findall(r"input gradient (\S+)$", out, re.M)]
    assert len(dgrads) == 5 and max(dgrads) < 1e-5, out
    assert out.count("total: XLA") == 4  # the conv, the layer, the weight and the input gradient
    totals = [float(t) for t in re.findall(r"([-+]\d+\.\d+) ms a step saved \(negative", out)]
    step = float(re.search(r"layer \+ weight gradient \+ input gradient: ([-+]\d+\.\d+) ms a step saved", out)[1])
    assert abs(step - sum(totals[1:])) < 2e-3  # the three a training step runs; the conv alone is in the layer
