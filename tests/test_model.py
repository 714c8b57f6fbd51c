"""The model: any size in, same size out; the 1x1 facts of GUIDE.md made executable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import fcn
from fcn.model import UNet

CPU = jax.default_backend() == "cpu"


def tiny(**kw):
    kw = {"features": 4, "depth": 2, **kw}
    return UNet(3, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("hw", [(360, 480), (37, 101), (1, 1), (2, 513), (1000, 3), (17, 17)])
def test_output_size_equals_input_size(hw):
    model = tiny(depth=3)
    model.eval()
    logits = model(jnp.zeros((1, *hw, 3)))
    assert logits.shape == (1, *hw, 3)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


_SHARED = tiny(depth=2, norm="group")
_FORWARD = nnx.jit(lambda model, x: model(x))  # one compilation per size, not one per op and size


@settings(max_examples=6, deadline=None)
@given(h=st.integers(1, 45), w=st.integers(1, 45), b=st.integers(1, 2))
def test_any_size_property(h, w, b):
    x = np.random.default_rng(h * 100 + w).random((b, h, w, 3), np.float32)
    out = _FORWARD(_SHARED, x)
    assert out.shape == (b, h, w, 3)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize(
    "kw",
    [
        {"head": "stacked"},
        {"head": "mlp", "bottleneck": 2},
        {"upsample": "resize", "norm": "none"},
        {"norm": "group", "dropout": 0.5},
    ],
)
def test_variants_keep_size(kw):
    model = tiny(**kw)
    out = model(jnp.ones((2, 21, 30, 3)), rngs=nnx.Rngs(dropout=1))
    assert out.shape == (2, 21, 30, 3)


def test_bottleneck_cuts_parameters():
    plain = nnx.eval_shape(lambda: tiny(features=16))
    narrow = nnx.eval_shape(lambda: tiny(features=16, bottleneck=4))
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert count(narrow) < count(plain)


def test_mixed_precision_keeps_params_and_logits_float32():
    model = tiny(dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    out = model(jnp.ones((1, 20, 24, 3)))
    assert out.dtype == jnp.float32
    ref = tiny()(jnp.ones((1, 20, 24, 3)))
    np.testing.assert_allclose(out, ref, atol=0.15, rtol=0.1)


def test_probabilities_non_negative_and_sum_to_one():
    model = tiny()
    probs = fcn.predict_proba(model, jax.random.uniform(jax.random.key(0), (2, 19, 23, 3)))
    assert probs.shape == (2, 19, 23, 3)
    assert float(probs.min()) >= 0
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_probabilities_are_inference_mode_and_leave_the_model_as_it_was():
    model = fcn.UNet(3, features=4, depth=2, dropout=0.5, rngs=nnx.Rngs(0))  # training mode, as built
    x = jax.random.uniform(jax.random.key(0), (2, 19, 23, 3))
    before = jax.tree.map(np.array, nnx.state(model))
    probs = fcn.predict_proba(model, x)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)  # running statistics kept
    bns = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    assert bns and not any(bn.use_running_average for bn in bns)  # still in training mode
    eval_model = nnx.clone(model)
    eval_model.eval()
    np.testing.assert_allclose(probs, jax.nn.softmax(eval_model(x), -1), atol=1e-6)
    np.testing.assert_array_equal(fcn.predict_proba(model, x), probs)  # no dropout
    np.testing.assert_array_equal(fcn.predict_proba(eval_model, x), probs)


def test_1x1_conv_is_a_dense_layer_at_every_pixel():
    conv = nnx.Conv(6, 4, (1, 1), rngs=nnx.Rngs(0))
    x_BHWC = jax.random.normal(jax.random.key(1), (2, 5, 7, 6))
    kernel_CK = conv.kernel[...][0, 0]
    dense = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    dense.kernel[...] = kernel_CK
    dense.bias[...] = conv.bias[...]
    out = conv(x_BHWC)
    np.testing.assert_allclose(out, dense(x_BHWC), atol=1e-5)
    np.testing.assert_allclose(out, jnp.einsum("bhwc,ck->bhwk", x_BHWC, kernel_CK) + conv.bias[...], atol=1e-5)
    for b, i, j in [(0, 0, 0), (1, 4, 6), (0, 2, 3)]:  # one pixel alone, through a plain matmul
        np.testing.assert_allclose(out[b, i, j], np.asarray(x_BHWC[b, i, j]) @ kernel_CK + conv.bias[...], atol=1e-5)


def test_linear_head_on_a_large_input_equals_each_pixel_alone():
    head = fcn.model.Head(8, 5, "linear", conv=lambda *a, **k: nnx.Conv(*a, **k), rngs=nnx.Rngs(0))
    x_BHWC = jax.random.normal(jax.random.key(2), (1, 40, 50, 8))
    full = head(x_BHWC)
    for i, j in [(0, 0), (39, 49), (17, 23)]:
        alone = head(x_BHWC[:, i : i + 1, j : j + 1])
        np.testing.assert_allclose(full[:, i, j], alone[:, 0, 0], atol=1e-5)


def _compose(k1, k2):
    """Kernel of conv(k2) after conv(k1) (cross-correlation, HWIO): sizes add minus one."""
    a, _, c_in, c_mid = k1.shape
    b, _, _, c_out = k2.shape
    n = a + b - 1
    out = np.zeros((n, n, c_in, c_out))
    for u in range(b):
        for v in range(b):
            out[u : u + a, v : v + a] += np.einsum("hwim,mo->hwio", k1, k2[u, v])
    return out


def test_stacked_head_is_one_5x5_convolution():
    head = fcn.model.Head(3, 2, "stacked", conv=lambda *a, **k: nnx.Conv(*a, **k), rngs=nnx.Rngs(0))
    convs = list(head.layers)
    for c in convs:  # non-zero biases, so the composite bias is checked too
        c.bias[...] = jax.random.normal(jax.random.key(c.kernel.shape[-1]), c.bias.shape)
    k1, k2, k3 = (np.asarray(c.kernel[...], np.float64) for c in convs)
    b1, b2, b3 = (np.asarray(c.bias[...], np.float64) for c in convs)
    k5 = _compose(_compose(k1, k2), k3)
    bias = (b1 @ k2.sum(axis=(0, 1)) + b2) @ k3[0, 0] + b3
    x_BHWC = jax.random.normal(jax.random.key(3), (1, 16, 18, 3))
    out = np.asarray(head(x_BHWC))
    ref = jax.lax.conv_general_dilated(
        np.asarray(x_BHWC, np.float64), k5, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    ref = np.asarray(ref) + bias
    # VALID output pixel (i, j) is centred on input (i + 2, j + 2): compare away from the borders.
    np.testing.assert_allclose(out[:, 2:-2, 2:-2], ref, atol=1e-4)


def test_eager_call_runs_jitted_with_the_traced_values_and_updates_batch_norm():
    model = tiny(depth=2)
    x = np.random.default_rng(0).random((2, 20, 24, 3), np.float32)
    graph, state = nnx.split(model)

    @jax.jit
    def traced(state, x):  # the plain path: inside a trace UNet.__call__ runs operation by operation
        m = nnx.merge(graph, state)
        return m(x), nnx.state(m)

    means = lambda s: [np.array(v) for p, v in nnx.to_flat_state(s) if p[-1] == "mean"]  # noqa: E731
    before = means(state)
    assert before and not any(np.any(m) for m in before)  # running means start at 0
    want, want_state = traced(state, x)
    got = model(x)  # eager: through fcn.model._call_jitted
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for got_m, want_m in zip(means(nnx.state(model)), means(want_state), strict=True):
        assert np.any(got_m)  # the eager call updated the module's statistics, as eager code would
        np.testing.assert_allclose(got_m, want_m, rtol=1e-5, atol=1e-6)


def test_eager_gradient_steps_through_the_jitted_call_reduce_the_loss():
    # A hand-written notebook loop: nnx.value_and_grad outside jit, the images concrete, so the
    # model's call goes through fcn.model._call_jitted with traced parameters.
    import optax

    model = tiny(depth=2)
    rng = np.random.default_rng(0)
    x, y = rng.random((2, 16, 16, 3), np.float32), rng.integers(0, 3, (2, 16, 16))
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
    # plain SGD: each step the gradient itself, scaled (Adam's op-by-op update compiled 5 s more of small programs)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    losses = []
    for _ in range(4):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_classes"):
        UNet(1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.head"):
        tiny(head="dense")
    with pytest.raises(ValueError, match="empty image"):
        tiny()(jnp.zeros((1, 0, 5, 3)))


def test_a_bad_pad_mode_or_channel_count_is_named_at_once():
    """A misspelt pad_mode was accepted, and failed only at the first image whose size needed
    padding, inside jnp.pad; images with the wrong channel count failed inside the convolution."""
    with pytest.raises(ValueError, match="model.pad_mode='mirror'.*reflect"):
        tiny(pad_mode="mirror")
    with pytest.raises(ValueError, match="in_channels=3 got images of 1 channels"):
        tiny()(jnp.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize("channels", [1, 4])
def test_any_number_of_input_channels(channels):
    """in_channels > 3 (RGBA, RGB + depth) failed to broadcast ImageNet's three means."""
    model = tiny(in_channels=channels)
    model.eval()
    assert model(jnp.full((1, 5, 7, channels), 0.5)).shape == (1, 5, 7, 3)
    mean, std = fcn.model.input_stats(channels)
    assert len(mean) == len(std) == channels and mean[:3] == fcn.model._MEAN[:channels]


@pytest.mark.parametrize("follows", ["xla conv", "onednn conv", "xla conv off the CPU"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_training_batch_norm_equals_nnx_batch_norm(dtype, relu, follows, monkeypatch):
    """fcn.norm.batch_norm_train (the U-Net's batch norm in training, fused with the ReLU after it,
    with its own gradient; after a oneDNN conv, oneDNN's): nnx.BatchNorm's output,
    updated running statistics, and gradients for the input, scale and bias, under jit."""
    from fcn import onednn, ops
    from fcn.norm import batch_norm_train

    if follows.endswith("off the CPU"):  # fcn.norm's GPU and TPU form: no optimization barriers
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    impl = "auto" if follows == "onednn conv" else "xla"
    conv = nnx.Conv(8, 8, (3, 3), conv_general_dilated=ops.conv_fn(impl), rngs=nnx.Rngs(0))
    by_onednn = impl == "auto" and relu and CPU and onednn.supports(dtype)

    bn = nnx.BatchNorm(8, momentum=0.9, dtype=dtype, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(1), 3)
    bn.scale.set_value(jax.random.normal(keys[0], (8,)))
    bn.bias.set_value(jax.random.normal(keys[1], (8,)))
    bn.mean.set_value(jnp.arange(8.0))
    bn.var.set_value(jnp.arange(8.0) + 1)
    x = 3 * jax.random.normal(keys[2], (2, 5, 7, 8)) + 1
    graph, params, stats = nnx.split(bn, nnx.Param, ...)

    def run(norm, params, x):
        model = nnx.merge(graph, params, jax.tree.map(lambda v: v, stats))
        return norm(model, x), nnx.state(model, nnx.BatchStat)

    def both(norm):
        y, after = jax.jit(lambda p, x: run(norm, p, x))(params, x)
        loss = lambda x, p: jnp.sum(jnp.sin(3 * run(norm, p, x)[0].astype(jnp.float32)))
        return y, after, jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)

    def reference(model, x):
        y = model(x)
        return jax.nn.relu(y) if relu else y

    y_ref, after_ref, (dx_ref, dp_ref) = both(reference)
    ours = lambda m, x: batch_norm_train(m, x, relu=relu, conv=conv)  # noqa: E731
    y, after, (dx, dp) = both(ours)
    text = jax.jit(jax.grad(lambda x: run(ours, params, x)[0].sum())).lower(x).as_text()
    assert ("fcn_onednn_bn_relu_fwd" in text and "fcn_onednn_bn_relu_bwd" in text) == by_onednn
    assert ("optimization_barrier" in text) == (relu and not by_onednn and jax.default_backend() == "cpu")
    assert y.dtype == y_ref.dtype == dtype
    assert not relu or (np.asarray(y_ref) == 0).mean() > 0.2  # the ReLU has work to do
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), tol, tol)
    close(y, y_ref)
    for name in ("mean", "var"):
        close(after[name].get_value(), after_ref[name].get_value())
        assert not np.allclose(after[name].get_value(), stats[name].get_value())  # they were updated
    close(dx, dx_ref)
    for name in ("scale", "bias"):
        assert np.abs(dp_ref[name].get_value()).max() > 0.1
        close(dp[name].get_value(), dp_ref[name].get_value())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_inference_folds_batch_norm_into_the_convolution(dtype, monkeypatch):
    """Inference's batch norm is folded into the conv before it (scale into the kernel, shift a
    bias), leaving conv + bias + ReLU, which XLA:GPU gives to cuDNN as one call: the same outputs as
    batch norm applied after the conv, and no per-pixel multiply left."""
    from fcn import model as model_lib, ops

    model = UNet(3, features=8, depth=2, dtype=dtype, conv_general_dilated=ops.conv_fn("xla"), rngs=nnx.Rngs(0))
    for i, bn in enumerate(v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.BatchNorm)):
        k = jax.random.split(jax.random.key(i), 4)  # running statistics and affine other than 0 and 1
        bn.mean.set_value(0.3 * jax.random.normal(k[0], bn.mean.shape))
        bn.var.set_value(0.5 + jax.random.uniform(k[1], bn.var.shape))
        bn.scale.set_value(1 + 0.3 * jax.random.normal(k[2], bn.scale.shape))
        bn.bias.set_value(0.2 * jax.random.normal(k[3], bn.bias.shape))
    model.eval()
    x = jax.random.uniform(jax.random.key(9), (2, 24, 40, 3))
    forward = lambda m, x: m(x)  # noqa: E731
    activation = f"tensor<2x24x40x8x{'f32' if dtype == jnp.float32 else 'bf16'}>"

    def multiplies(m):  # per-pixel multiplies at the first level's activations
        text = nnx.jit(forward).lower(m, x).as_text()
        return sum(activation in line for line in text.splitlines() if "stablehlo.multiply" in line)

    assert multiplies(model) == 0
    folded = np.asarray(nnx.jit(forward)(model, x), np.float32)
    monkeypatch.setattr(model_lib, "conv_bias_relu", lambda *args: None)  # batch norm after the conv
    assert multiplies(model) > 0
    plain = np.asarray(nnx.jit(forward)(model, x), np.float32)
    assert np.linalg.norm(folded - plain) / np.linalg.norm(plain) < (1e-6 if dtype == jnp.float32 else 2e-2)


@settings(max_examples=12, deadline=None)
@given(
    size_in=st.tuples(st.integers(1, 50), st.integers(1, 50)),
    size_out=st.tuples(st.integers(1, 120), st.integers(1, 120)),
    antialias=st.booleans(),
)
def test_linear_resize_equals_jax_image_resize(size_in, size_out, antialias):
    """fcn.resize.linear (the model's input and logits resizes): jax.image.resize's values, up and
    down, antialiased or not, computed from a few gathered taps instead of dense weight matrices."""
    from fcn import resize

    x = np.random.default_rng(sum(size_in + size_out)).random((2, *size_in, 3), dtype=np.float32)
    want = jax.image.resize(x, (2, *size_out, 3), "linear", antialias=antialias)
    got = jax.jit(lambda v: resize.linear(v, size_out, antialias=antialias))(x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    if size_in != size_out:
        jaxpr = str(jax.make_jaxpr(lambda v: resize.linear(v, size_out, antialias=antialias))(x))
        assert "gather" in jaxpr and "dot_general" not in jaxpr


@pytest.mark.parametrize(
    "size_in, size_out, antialias",
    [((1, 1), (2, 2), True), ((5, 3), (10, 6), True), ((22, 30), (44, 60), False), ((9, 14), (4, 31), True)],
)
def test_linear_resize_gradient_is_jax_image_resizes_without_scatters(size_in, size_out, antialias):
    """The gradient (the U-Net's bilinear upsampling is trained through it) is jax.image.resize's,
    computed by gathers over the transposed weights: no scatter, no dense product."""
    from fcn import resize

    rng = np.random.default_rng(0)
    x = rng.random((2, *size_in, 3), dtype=np.float32)
    w = rng.normal(size=(2, *size_out, 3)).astype(np.float32)
    ours = lambda v: jnp.sum(resize.linear(v, size_out, antialias=antialias) * w)  # noqa: E731
    theirs = lambda v: jnp.sum(jax.image.resize(v, (2, *size_out, 3), "linear", antialias=antialias) * w)  # noqa: E731
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(theirs)(x), atol=1e-5, rtol=1e-5)
    jaxpr = str(jax.make_jaxpr(jax.grad(ours))(x))
    assert "gather" in jaxpr and "scatter" not in jaxpr and "dot_general" not in jaxpr


def test_linear_resize_with_a_symbolic_batch_and_the_model_with_input_scale():
    from fcn import resize

    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, 9, 14, 3), jnp.float32)
    exported = jax.export.export(jax.jit(lambda v: resize.linear(v, (20, 5))))(spec)
    x = np.random.default_rng(0).random((3, 9, 14, 3), dtype=np.float32)
    np.testing.assert_allclose(exported.call(x), jax.image.resize(x, (3, 20, 5, 3), "linear"), atol=1e-5, rtol=0)
    # A model that runs at half size resizes its input down (antialiased) and its logits back up.
    model = UNet(3, features=4, depth=2, input_scale=0.5, rngs=nnx.Rngs(0))
    model.eval()
    x = jax.random.uniform(jax.random.key(1), (1, 37, 50, 3))
    small = jax.image.resize(x, (1, 18, 25, 3), "linear", antialias=True)
    want = jax.image.resize(model(small, prescaled=True), (1, 37, 50, 3), "linear")
    np.testing.assert_allclose(model(x), want, atol=1e-4, rtol=0)
