"""The prototype conv kernel of benchmarks/fused_conv.py (3x3 conv with batch norm + ReLU on its
input and batch norm's sums of its output), interpreted on the CPU, against XLA's conv and
fcn.norm; its list of the network's convs against fcn's model; its lowering for a GPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import fused_conv
from fcn import model as model_lib


def _case(shape, c_out, dtype=jnp.float32, seed=0):
    return fused_conv._inputs(shape, c_out, dtype, np.random.default_rng(seed))


@pytest.mark.parametrize("bn", [False, True])
def test_conv_and_sums_match_xla_at_the_image_edges_and_a_partial_last_block(bn):
    # 2 x 5 x 7 = 70 pixels in blocks of 64: the second block is mostly past the end; every tap of
    # a 5 x 7 image reaches over an edge somewhere. Two input chunks of 16 channels, two output blocks.
    x, w, stats = _case((2, 5, 7, 32), 32)
    stats = stats if bn else None
    y, sums = fused_conv.conv3x3(x, w, stats, bm=64, bn=16, bk=16)
    a = x if stats is None else jax.nn.relu((x - stats[0]) * stats[1] + stats[2])
    want = jax.lax.conv_general_dilated(
        a, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    y64 = np.asarray(want, np.float64).reshape(-1, 32)
    np.testing.assert_allclose(sums, np.stack([y64.sum(0), (y64**2).sum(0)]), rtol=1e-5, atol=1e-4)
    mean, var = fused_conv.stats_from_sums(sums, 70)
    np.testing.assert_allclose(mean, y64.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, y64.var(0), rtol=1e-4, atol=1e-5)


def test_bfloat16_layer_matches_xlas_to_rounding():
    x, w, stats = _case((2, 8, 8, 16), 32, jnp.bfloat16)
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
    setting = fused_conv.parse_setting("128x64x32x4x3")
    assert setting == dict(bm=128, bn=64, bk=32, num_warps=4, num_stages=3)
    assert fused_conv.fits(16, 32, setting) == dict(setting, bn=32, bk=16)
    assert fused_conv.fits(8, 32, setting) is None  # Triton's products need 16 channels a side
    assert fused_conv.fits(48, 32, setting) is None  # 48 is no multiple of a power-of-two block of 32
    with pytest.raises(ValueError, match="channels 8 -> 32"):
        fused_conv.conv3x3(*_case((1, 4, 4, 8), 32)[:2])


def test_the_list_of_convs_is_the_models():
    """Every 3x3 conv of fcn's U-Net with 16 input channels or more, in order, at the padded size."""
    convs = fused_conv.network_convs(2, (20, 30), 16, 2)
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
    for bn in (False, True):
        x = jax.ShapeDtypeStruct((16, 23, 30, 512), jnp.bfloat16)  # 11040 pixels: a partial last block
        w = jax.ShapeDtypeStruct((3, 3, 512, 512), jnp.float32)
        stats = tuple(jax.ShapeDtypeStruct((512,), jnp.float32) for _ in range(3)) if bn else None
        fn = jax.jit(lambda x, w, s: fused_conv.fused_layer(x, w, s, bm=128, bn=128, bk=32, interpret=False))
        text = fn.trace(x, w, stats).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1, bn
        assert "grid_x = 87" in text and "grid_y = 4" in text  # ceil(11040 / 128) blocks, 512 / 128


def test_runs_end_to_end_on_a_tiny_network(capsys):
    fused_conv.main(["--batch", "1", "--size", "8", "8", "--features", "16", "--depth", "1", "--rounds", "1",
                     "--steps", "1", "--kernels", "64x32x16x4x3"])  # fmt: skip
    out = capsys.readouterr().out
    assert "the kernel interpreted: values, not speed" in out
    diffs = [float(d) for d in re.findall(r"output (\S+) of its largest", out)]
    assert len(diffs) == 5 and max(diffs) < 1e-5, out  # the network's five convs with 16 channels or more
    assert "total: conv XLA" in out
