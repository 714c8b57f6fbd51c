"""bfloat16 on a CPU: fcn.onednn's handlers in bfloat16 where oneDNN has fast code for it here,
XLA's convolutions where it has not, and biases whose gradients are summed in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE
from flax import nnx
from jax import lax

from configs import tiny
from fcn import layers, onednn, ops, state as state_lib
from fcn.data import get_source
from fcn.model import UNet

DN = ("NHWC", "HWIO", "NHWC")
BF16 = jnp.bfloat16
CPU = jax.default_backend() == "cpu"
needs_bf16 = pytest.mark.skipif(
    not (CPU and onednn.supports(BF16)), reason=f"no fast bfloat16 in oneDNN here: {onednn.impls(BF16)}"
)


def random(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32)).astype(dtype)


def hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def f32(a):
    return np.asarray(a, np.float32)


def close(got, want, tol, name=""):
    """Equal to bfloat16's precision: within tol of the largest value."""
    got, want = f32(got), f32(want)
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()), err_msg=name)


@pytest.mark.skipif(not CPU, reason="oneDNN's handlers are XLA:CPU custom calls")
def test_what_onednn_runs_here_is_named():
    assert onednn.available(), onednn.unavailable_reason()
    names = ["isa", "fwd", "bwd_data", "bwd_weights", "bn_fwd", "bn_bwd"]
    assert [part.partition(":")[0] for part in onednn.impls(jnp.float32).split()] == names
    # bfloat16 is fast where the CPU has bfloat16 instructions, and oneDNN makes every primitive and
    # none is its reference code (a plain loop).
    parts = [part.partition(":") for part in onednn.impls(BF16).split()]
    native = parts[0][2] in ("avx512_core_bf16", "avx512_core_fp16", "avx512_core_amx", "avx512_core_amx_fp16")
    made = [p[0] for p in parts] == names
    assert onednn.supports(BF16) == (native and made and not any(p[2].startswith("ref") for p in parts[1:]))
    assert onednn.supports(jnp.float32) and not onednn.supports(jnp.float16)


@needs_bf16
@pytest.mark.parametrize(
    ("shape", "k", "c_out", "strides"),
    [((2, 17, 13, 3), 3, 16, (1, 1)), ((1, 12, 16, 32), 3, 16, (1, 1)), ((2, 6, 8, 16), 1, 12, (1, 1))],
)
def test_bfloat16_convolutions_equal_lax_on_the_same_values(shape, k, c_out, strides):
    # The same bfloat16 operands; lax's sums in float32 (oneDNN's do), the result rounded to bfloat16.
    x, w, r = random(0, shape, BF16), random(1, (k, k, shape[-1], c_out), BF16), random(2, (1,))
    pads = tuple(onednn.padding_pairs("SAME", shape[1:3], (k, k), strides))

    def ref(x, w):
        y = lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN, preferred_element_type=jnp.float32)
        return y.astype(BF16)

    def run(conv):
        out = random(3, jax.eval_shape(ref, x, w).shape, BF16)
        loss = lambda x, w: jnp.sum((conv(x, w) * out).astype(jnp.float32)) * r[0]  # noqa: E731
        return jax.jit(lambda x, w: (conv(x, w), *jax.grad(loss, argnums=(0, 1))(x, w)))(x, w)

    got = run(lambda x, w: onednn.conv(x, w, strides, pads))
    for name, g, want in zip(("value", "dx", "dw"), got, run(ref)):
        assert g.dtype == BF16, name
        close(g, want, 2e-2, name)


@needs_bf16
def test_bfloat16_weight_gradient_is_zero_at_taps_that_meet_only_padding():
    """A 1-pixel-wide image under a 3x3 conv (the deepest level of a U-Net on a small or odd-sized image):
    the taps beside the centre meet only padding. oneDNN's bfloat16 weight gradient on AMX left there
    what earlier calls had left in its buffers: the last gradient's values, or 1e27."""
    for shape, strides in [
        ((1, 3, 1, 13), (3, 3)),
        ((1, 3, 1, 16), (3, 3)),
        ((1, 3, 1, 13), (1, 1)),
        ((1, 3, 3, 13), (3, 3)),
        ((1, 1, 1, 13), (3, 3)),
        ((2, 1, 5, 8), (1, 1)),
    ]:
        x = random(0, shape, BF16)
        pads = tuple(onednn.padding_pairs("SAME", shape[1:3], (3, 3), strides))
        w = jnp.zeros((3, 3, shape[-1], shape[-1]), BF16)
        lax_conv = lambda x, w, s=strides, p=pads: lax.conv_general_dilated(x, w, s, p, dimension_numbers=DN)  # noqa: E731
        dy = random(2, jax.eval_shape(lax_conv, x, w).shape, BF16)
        want = weight_grad(lax_conv, x, w, dy, jnp.float32)  # the same values, summed in float32
        got = weight_grad(lambda x, w, s=strides, p=pads: onednn.conv(x, w, s, p), x, w, dy, BF16)
        close(got, want, 2e-2, f"{shape} strides {strides}")


def weight_grad(conv, x, w, dy, dtype):
    """The gradient of conv(x, w) with respect to w for the output gradient dy, computed in `dtype`."""
    x, w, dy = (a.astype(dtype) for a in (x, w, dy))
    return jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]


@needs_bf16
def test_bfloat16_conv_bias_relu_and_batch_norm():
    x, w, b = random(0, (2, 9, 11, 16), BF16), random(1, (3, 3, 16, 16), BF16), random(2, (16,))
    pads = ((1, 1), (1, 1))
    y = onednn.conv_bias_relu(x, w, b, (1, 1), pads)
    want = jax.nn.relu(
        lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=DN, preferred_element_type=jnp.float32) + b
    )
    assert y.dtype == BF16 and (f32(want) == 0).mean() > 0.3
    close(y, want, 2e-2)
    scale, shift = 1 + 0.3 * random(3, (16,)), random(4, (16,))
    y, mean, var = jax.jit(lambda x: onednn.bn_relu(x, scale, shift, 1e-5))(x)
    x32 = f32(x)
    np.testing.assert_allclose(mean, x32.mean((0, 1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, x32.var((0, 1, 2)), rtol=1e-4)
    assert y.dtype == BF16 and mean.dtype == var.dtype == jnp.float32
    close(y, np.maximum((x32 - x32.mean((0, 1, 2))) / np.sqrt(x32.var((0, 1, 2)) + 1e-5) * scale + shift, 0), 2e-2)


def _steps(config, impl, n=2):
    config.model.conv_impl = impl
    split = get_source(config.data).load("train")
    batch = np.stack(split.images[:4]), np.stack(split.labels[:4]), np.array([lab.shape for lab in split.labels[:4]])
    graphs, state, tx = state_lib.create(config, 4)
    # Compiled without LLVM's optimisation (oneDNN's calls are no LLVM code; XLA's steps alike): they run twice,
    # and optimising XLA:CPU's bfloat16 code took most of the test.
    fast = dict(FAST_COMPILE)
    fast.update(ops.train_compiler_options(impl) or {})
    step = state_lib.jit_train_step(config, graphs, tx, 4, 255, compiler_options=fast)
    outs = []
    for _ in range(n):
        state, out = step(state, *batch)
        outs.append(jax.device_get(out))
    return outs, jax.device_get(state["params"])


@needs_bf16
def test_bfloat16_training_steps_on_onednn_equal_xla_s():
    config = tiny.get_config()
    config.model.dtype = "bfloat16"
    outs, params = _steps(config, "auto")
    outs_xla, params_xla = _steps(config, "gemm")
    for out, ref in zip(outs, outs_xla):
        np.testing.assert_allclose(out["loss"], ref["loss"], rtol=2e-2)
        np.testing.assert_allclose(out["grad_norm"], ref["grad_norm"], rtol=5e-2)
    diffs = [np.abs(f32(a) - f32(b)).max() for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_xla))]
    assert max(diffs) < 2e-2  # two Adam steps of about 1e-3 each, apart by bfloat16's rounding at most


@pytest.mark.skipif(not CPU, reason="oneDNN's handlers are XLA:CPU custom calls")
def test_bfloat16_network_uses_onednn_only_where_it_is_fast(monkeypatch):
    model = UNet(3, features=8, depth=2, dtype=BF16, conv_general_dilated=ops.conv_fn("auto"), rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)
    x = random(0, (2, 16, 24, 3))
    grad = jax.grad(lambda s, x: nnx.merge(graph, s)(x).astype(jnp.float32).sum())
    text = hlo(grad, state, x)
    fast = onednn.supports(BF16)
    assert ("fcn_onednn_conv_bwd_weights" in text) == fast and ("fcn_onednn_bn_relu_bwd" in text) == fast
    if fast:  # where it is not, the same network on XLA's convolutions
        monkeypatch.setattr(onednn, "supports", lambda dtype: jnp.dtype(dtype) == jnp.float32)
        assert "fcn_onednn" not in hlo(lambda s, x: grad(s, x), state, x)  # traced anew


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_a_float32_bias_in_bfloat16_gets_its_gradient_summed_in_float32(backend, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    y, b = random(0, (4, 64, 64, 8), BF16) + 3, random(1, (8,))
    dy = random(2, y.shape, BF16) + 1  # a long sum of values near 1: bfloat16 sums lose most of it
    out, vjp = jax.vjp(layers.add_bias, y, b)
    dy_back, db = jax.jit(vjp)(dy)
    assert out.dtype == BF16 and db.dtype == jnp.float32 and dy_back.dtype == BF16
    close(out, f32(y) + f32(b.astype(BF16)), 1e-2)
    exact = f32(dy).astype(np.float64).sum((0, 1, 2))
    bf16_sum = "-> tensor<8xbf16>" in hlo(vjp, dy)  # jax's own gradient: a sum in bfloat16
    if backend == "cpu":  # float32 sums, to float32's precision
        assert not bf16_sum
        np.testing.assert_allclose(db, exact, rtol=1e-5)
    else:  # elsewhere jax's own, unchanged (run by XLA:CPU here, it gave 4224 for 16218)
        assert bf16_sum


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_conv_equals_nnx_conv(dtype):
    # fcn.layers.Conv (the U-Net's) against nnx.Conv with the same parameters: values and gradients.
    ours = layers.Conv(6, 5, (3, 3), dtype=dtype, rngs=nnx.Rngs(0))
    theirs = nnx.Conv(6, 5, (3, 3), dtype=dtype, rngs=nnx.Rngs(0))
    theirs.bias.set_value(ours.bias.get_value() + 0.5)
    ours.bias.set_value(theirs.bias.get_value())
    x = random(0, (2, 7, 9, 6))

    def value_and_grads(module):
        graph, params = nnx.split(module)
        loss = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graph, p)(x).astype(jnp.float32)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (v, (dp, dx)), (v_ref, (dp_ref, dx_ref)) = value_and_grads(ours), value_and_grads(theirs)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert ours(x).dtype == theirs(x).dtype == dtype
    close(v, v_ref, tol)
    close(dx, dx_ref, tol)
    for name in ("kernel", "bias"):
        close(dp[name].get_value(), dp_ref[name].get_value(), tol, name)


@pytest.mark.skipif(not CPU, reason="a CPU's choice")
def test_bfloat16_where_onednn_has_no_fast_code_is_refused_or_warned(monkeypatch, caplog):
    from fcn.config import ConfigError, validate

    monkeypatch.setattr(onednn, "supports", lambda dtype: jnp.dtype(dtype) == jnp.float32)
    config = tiny.get_config()
    config.model.dtype = "bfloat16"
    config.model.conv_impl = "onednn"
    with pytest.raises(ConfigError, match="dtype='bfloat16' with conv_impl='onednn'.*use float32"):
        validate(config)
    config.model.conv_impl = "auto"
    with caplog.at_level("WARNING"):
        validate(config)
    assert "XLA's own convolutions" in caplog.text and "model.dtype='float32' is faster here" in caplog.text
    caplog.clear()
    config.model.dtype = "float32"
    validate(config)
    assert not caplog.text
