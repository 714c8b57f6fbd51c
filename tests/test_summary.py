"""fcn.summary: the per-layer table, its parameters and its FLOPs (2 x multiply-adds, XLA's count)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import fcn
from fcn.model import UNet
from fcn.summary import layer_rows


def tiny(**kw):
    kw = {"features": 4, "depth": 2, **kw}
    return UNet(3, rngs=nnx.Rngs(0), **kw)


def test_summary_table_has_totals_matching_parameter_count():
    model = tiny(depth=2)
    text = fcn.summary(model, (1, 37, 41, 3))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert f"{count:,}" in text.splitlines()[-1]
    assert "(1, 37, 41, 3)" in text and "FLOPs" in text and "ConvTranspose" in text


def test_summary_of_an_abstract_model_equals_the_built_one_dropout_too():
    # nnx.eval_shape skips the initialisers (about a second of compilation each on CPU).
    built = tiny(depth=2, dropout=0.1)
    abstract = nnx.eval_shape(lambda: tiny(depth=2, dropout=0.1))
    assert fcn.summary(abstract, (1, 20, 24, 3)) == fcn.summary(built, (1, 20, 24, 3))


def test_summary_flops_are_the_same_whatever_the_conv_impl():
    """oneDNN's convolutions (conv_impl "auto" on a CPU) are custom calls that XLA's cost analysis
    counts as no FLOPs: scripts/ablation.py's table gave 0.0 GFLOPs for every variant."""
    xla = fcn.summary(tiny(depth=2), (1, 20, 24, 3))
    for impl in ("gemm", "auto"):
        assert fcn.summary(tiny(depth=2, conv_general_dilated=fcn.ops.conv_fn(impl)), (1, 20, 24, 3)) == xla


def test_summary_of_a_model_in_inference_mode_lists_every_conv():
    """In inference mode batch norm is folded into the conv before it (fcn.norm.conv_bias_relu),
    which calls no conv module: the table lost every such conv, only the transposed convs and the
    head were left."""
    model = tiny(depth=2)
    trained = fcn.summary(model, (1, 20, 24, 3))
    model.eval()
    assert fcn.summary(model, (1, 20, 24, 3)) == trained
    assert model.down[0].norms[0].norm.use_running_average  # the model itself is left in its mode


def test_summary_flops_are_twice_the_multiply_adds_of_each_conv():
    """Each conv's row against a count by hand: a 3x3 SAME conv's taps that fall inside the image
    ((3H - 2)(3W - 2) of 9HW; XLA leaves out the padding's), the 2x2 stride-2 transposed convs and the
    1x1 head each one multiply-add per input pixel, output pixel and channel pair, plus their bias."""
    rows, _ = layer_rows(tiny(depth=1, features=4), (2, 8, 12, 3))
    got = {r["name"]: r["flops"] for r in rows if r["type"] in ("Conv", "ConvTranspose")}  # not the norms

    def conv3(h, w, c_in, c_out):
        return 2 * 2 * (3 * h - 2) * (3 * w - 2) * c_in * c_out

    want = {
        "down/0/convs/0": conv3(8, 12, 3, 4),
        "down/0/convs/1": conv3(8, 12, 4, 4),
        "bottom/convs/0": conv3(4, 6, 4, 8),
        "bottom/convs/1": conv3(4, 6, 8, 8),
        "up/0": 2 * 2 * 8 * 12 * 8 * 4 + 2 * 8 * 12 * 4,
        "up_blocks/0/convs/0": conv3(8, 12, 8, 4),
        "up_blocks/0/convs/1": conv3(8, 12, 4, 4),
        "head/layers/0": 2 * 2 * 8 * 12 * 4 * 3 + 2 * 8 * 12 * 3,
    }
    assert got == want


def test_every_norm_has_a_row_and_the_rows_add_up_to_the_total():
    """Batch norm (the default) runs fused with its ReLU in training mode (fcn.norm.batch_norm_train),
    never through nnx.BatchNorm's call: the table had no batch-norm row, and its rows summed to 160
    parameters fewer than its total for a features=4, depth=2 U-Net."""
    for norm, kind in (("batch", "BatchNorm"), ("group", "GroupNorm"), ("none", None)):
        model = tiny(depth=2, norm=norm, bottleneck=2 if norm == "group" else 0)
        rows, total = layer_rows(model, (1, 20, 24, 3))
        assert (
            sum(r["params"] for r in rows)
            == total["params"]
            == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        )
        norms = [r for r in rows if r["type"] == kind]
        assert len(norms) == (10 if kind else 0), (norm, [r["name"] for r in rows])
        assert all(r["name"].endswith("/norm") and r["flops"] > 0 for r in norms)
        assert norms == [] or norms[0]["name"] == "down/0/norms/0/norm"


def test_a_summary_that_fails_leaves_every_later_model_working():
    """nnx.tabulate puts back the methods it wraps only when the model's call returns: after a summary
    of a bad shape (no batch axis) every later UNet(...) and model call raised AttributeError
    ('_nnx_tabulate_id') until the notebook's kernel restarted."""
    model = tiny()
    with pytest.raises(ValueError, match=r"images \[B, H, W, C\], got shape \(12, 16, 3\)"):
        fcn.summary(model, (12, 16, 3))
    again = tiny()  # built after the failure
    assert again(jnp.zeros((1, 12, 16, 3))).shape == (1, 12, 16, 3)
    assert model(jnp.zeros((1, 12, 16, 3))).shape == (1, 12, 16, 3)
    assert fcn.summary(again, (1, 12, 16, 3)) == fcn.summary(tiny(), (1, 12, 16, 3))
    assert all("_nnx_tabulate_id" not in str(vars(type(m)).get("__call__", "")) for _, m in nnx.iter_modules(again))


def test_the_default_input_shape_has_the_models_channels():
    """fcn.summary(model) summarised 360 x 480 RGB images whatever the model took: a model built for
    in_channels=4 (RGBA, RGB + depth) raised 'got images of 3 channels', about images no one gave."""
    model = nnx.eval_shape(lambda: tiny(depth=1, in_channels=4))
    text = fcn.summary(model)
    assert text == fcn.summary(model, (1, 360, 480, 4))
    assert "(1, 360, 480, 3)" in text.splitlines()[-1]  # the logits of 3 classes
