"""fcn.ops: every convolution implementation computes jax.lax's function, values and gradients (and
fcn.layers' pooling, XLA's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from fcn import ops
from fcn.layers import max_pool_2x2

DN = ("NHWC", "HWIO", "NHWC")
CPU = jax.default_backend() == "cpu"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # relative error of the whole tensor


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def value_and_grads(conv, x, w, **kw):
    """conv(x, w) and the gradients of <conv(x, w), r> for a random r, w.r.t. x and w (one jitted call)."""

    y = jax.eval_shape(lambda x, w: conv(x, w, **kw), x, w)
    r = random(7, y.shape, y.dtype)

    @jax.jit
    def run(x, w):
        loss = lambda x, w: jnp.sum((conv(x, w, **kw) * r).astype(jnp.float32))  # noqa: E731
        return conv(x, w, **kw), *jax.grad(loss, argnums=(0, 1))(x, w)

    return run(x, w)


def random(seed, shape, dtype):
    """Fresh standard-normal values (numpy's generator: no compilation per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def primitives(fn, *args) -> set[str]:
    return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_conv_fn_names():
    assert ops.conv_fn("xla") is None
    assert ops.conv_fn("gemm") is ops.conv_general_dilated
    assert callable(ops.conv_fn("auto"))
    with pytest.raises(ValueError, match="conv_impl=.fast.*xla, gemm, onednn, auto"):
        ops.conv_fn("fast")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(("c_in", "c_out"), [(1, 4), (3, 8), (24, 11)])
def test_conv_matches_lax(k, c_in, c_out, dtype):
    x = random(0, (2, 9, 12, c_in), dtype)
    w = random(1, (k, k, c_in, c_out), dtype)
    args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN)
    ref = value_and_grads(lax.conv_general_dilated, x, w, **args)
    for impl in ("gemm", "auto"):
        got = value_and_grads(ops.conv_fn(impl), x, w, **args)
        for g, r in zip(got, ref):
            assert g.shape == r.shape and g.dtype == r.dtype
            assert rel_err(g, r) < TOL[dtype]


def test_1x1_conv_is_a_matrix_product():
    x, w = jnp.ones((2, 4, 4, 3)), jnp.ones((1, 1, 3, 5))
    fn = lambda x, w: ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    assert "conv_general_dilated" not in primitives(fn, x, w)
    assert "conv_general_dilated" not in primitives(jax.grad(lambda x, w: fn(x, w).sum(), argnums=(0, 1)), x, w)


def test_auto_off_the_cpu_is_gemm(monkeypatch):
    # On an H200 "gemm" trained twice as fast as "xla" (docs/benchmarks.md): auto must pick it there.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x, w = jnp.ones((2, 4, 4, 3)), jnp.ones((1, 1, 3, 5))
    fn = lambda x, w: ops.conv_fn("auto")(x, w, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    assert primitives(fn, x, w) & {"dot_general"}
    assert not primitives(fn, x, w) & {"conv_general_dilated", "ffi_call"}


@pytest.mark.parametrize("impl", ["gemm", "auto"])  # auto: the products by oneDNN where it is available
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding"), [(2, 2, "SAME"), (2, 2, "VALID"), (4, 4, "SAME"), (3, 2, "SAME")]
)
def test_conv_transpose_matches_nnx(kernel, stride, padding, dtype, impl):
    def build(cls, **kw):
        return cls(
            6, 5, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, rngs=nnx.Rngs(0), **kw
        )

    ref_layer, layer = build(nnx.ConvTranspose), build(ops.ConvTranspose, conv_general_dilated=ops.conv_fn(impl))
    x = random(2, (2, 5, 7, 6), dtype)

    def run(m, x):
        graph, params = nnx.split(m)
        apply = lambda p, x: nnx.merge(graph, p)(x)  # noqa: E731
        y = jax.eval_shape(apply, params, x)
        r = random(3, y.shape, y.dtype)

        @jax.jit
        def f(params, x):
            y = apply(params, x)
            gp, gx = jax.grad(lambda p, x: jnp.sum((apply(p, x) * r).astype(jnp.float32)), argnums=(0, 1))(params, x)
            return y, gx, gp["kernel"][...], gp["bias"][...]

        return f(params, x), r

    (*got, db), r = run(layer, x)
    (*ref, _), _ = run(ref_layer, x)
    for g, want in zip(got, ref):
        assert g.shape == want.shape and g.dtype == want.dtype
        assert rel_err(g, want) < TOL[dtype]
    # The bias's gradient, the sum of r over the pixels, against float64's: nnx's sums in bfloat16
    # (2.5% off here), fcn's in float32 on a CPU (fcn.layers.add_bias).
    want = np.asarray(r, np.float64).sum((0, 1, 2))
    assert db.dtype == jnp.float32 and rel_err(db, want) < (1e-5 if CPU else TOL[dtype])


def test_conv_transpose_2x2_stride_2_is_a_matrix_product():
    layer = ops.ConvTranspose(4, 3, (2, 2), strides=(2, 2), rngs=nnx.Rngs(0), conv_general_dilated=ops.conv_fn("gemm"))
    x = jnp.ones((1, 3, 5, 4))
    assert "conv_general_dilated" not in primitives(lambda x: layer(x), x)
    assert "conv_general_dilated" not in primitives(jax.grad(lambda m: m(x).sum()), layer)


def _library_fusions(fn, compiler_options, *args) -> dict[str, int]:
    """How many of each XLA:CPU op the compiled program runs: YNNPACK fusions, bare convolutions."""
    text = jax.jit(fn).lower(*args).compile(compiler_options=compiler_options).as_text()
    return {"ynn": text.count('"kind":"__ynn_fusion"'), "convolution": text.count(" convolution(")}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's library fusions")
def test_train_compiler_options_move_only_convolutions_off_ynnpack(monkeypatch):
    """Without oneDNN, the training step's option is accepted by this jaxlib and does what fcn.ops says:
    the 3x3 convolution leaves YNNPACK for XLA's own kernels, the reduction stays YNNPACK's, values agree."""
    assert ops.train_compiler_options("auto") is None  # oneDNN here: no convolution left to XLA
    monkeypatch.setattr(ops, "_onednn_usable", lambda: False)
    options = ops.train_compiler_options("auto")
    assert options is not None
    assert ops.train_compiler_options("xla") is None and ops.train_compiler_options("gemm") is None
    with pytest.raises(ValueError, match="conv_impl='fast'"):
        ops.train_compiler_options("fast")
    # 32 channels: YNNPACK takes convolutions this wide (not 8 or 16 channels).
    x, w = random(0, (1, 16, 12, 32), jnp.float32), random(1, (3, 3, 32, 32), jnp.float32)
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    dw = jax.grad(lambda w, x: conv(x, w).sum())
    for fn in (conv, lambda x, w: dw(w, x)):
        assert _library_fusions(fn, None, x, w)["ynn"] >= 1
        assert _library_fusions(fn, options, x, w) == {"ynn": 0, "convolution": 1}
        want = jax.jit(fn)(x, w)
        got = jax.jit(fn).lower(x, w).compile(compiler_options=options)(x, w)
        assert rel_err(got, want) < 1e-5
    total = lambda x: jnp.sum(x, axis=(0, 1, 2))  # noqa: E731
    assert _library_fusions(total, options, x)["ynn"] == 1


def test_compiler_options_this_jaxlib_rejects_fall_back_to_defaults(caplog):
    assert ops._accepted((("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_NO_SUCH_THING"),)) is False
    assert "not accepted by this jaxlib" in caplog.text


def test_conv_transpose_keeps_nnx_parameters():
    a = nnx.ConvTranspose(4, 3, (2, 2), strides=(2, 2), rngs=nnx.Rngs(0))
    b = ops.ConvTranspose(4, 3, (2, 2), strides=(2, 2), rngs=nnx.Rngs(0), conv_general_dilated=ops.conv_fn("gemm"))
    sa, sb = nnx.state(a, nnx.Param), nnx.state(b, nnx.Param)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for u, v in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(u, v)
    # Without a convolution function it is nnx.ConvTranspose itself.
    x = random(4, (1, 3, 5, 4), jnp.float32)
    plain = ops.ConvTranspose(4, 3, (2, 2), strides=(2, 2), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(plain(x), a(x))


def test_max_pool_values_and_gradient_equal_xla_pooling_ties_included():
    rng = np.random.default_rng(0)
    # A ReLU's output: many windows of zeros (ties), and some ties at positive values too.
    x = np.maximum(rng.normal(size=(2, 6, 8, 3)), 0).astype(np.float32)
    x[0, 0:2, 0:2, 0] = 0.7
    x[1, 2, 4:6, 1] = 1.5

    def xla_pool(v):
        return nnx.max_pool(v, (2, 2), strides=(2, 2))

    np.testing.assert_array_equal(np.asarray(max_pool_2x2(x)), np.asarray(xla_pool(x)))
    w = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    ours = jax.grad(lambda v: jnp.sum(max_pool_2x2(v) * w))(x)
    xla = jax.grad(lambda v: jnp.sum(xla_pool(v) * w))(x)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(xla))  # first maximum of each window
    assert np.count_nonzero(np.asarray(ours)) == w.size  # one position per window takes the gradient
    direction = rng.normal(size=x.shape).astype(np.float32)
    _, along = jax.jvp(max_pool_2x2, (x,), (direction,))
    _, along_xla = jax.jvp(xla_pool, (x,), (direction,))
    np.testing.assert_array_equal(np.asarray(along), np.asarray(along_xla))


@pytest.mark.parametrize("shape", [(2, 3, 4, 1), (1, 4, 5, 2), (1, 1, 1, 3), (4, 4, 3)])
def test_max_pool_refuses_odd_sizes(shape):
    # The four strided slices of an odd H or W broadcast against each other: (2, 3, 4, 1) gave a
    # (2, 2, 2, 1) answer (XLA's VALID pooling: (2, 1, 2, 1)) with the middle row in both rows.
    with pytest.raises(ValueError, match=rf"even H and W, got shape \({shape[0]}, "):
        max_pool_2x2(jnp.zeros(shape))
