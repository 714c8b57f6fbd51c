"""fcn.onednn: oneDNN's convolutions through XLA's FFI compute jax.lax's function, and the seam
uses them only where it should."""

import logging
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fcn import onednn, ops

DN = ("NHWC", "HWIO", "NHWC")
CPU = jax.default_backend() == "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def value_and_grads(conv, x, w):
    r = random(9, jax.eval_shape(conv, x, w).shape)
    loss = lambda x, w: jnp.sum(conv(x, w) * r)  # noqa: E731
    return jax.jit(lambda x, w: (conv(x, w), *jax.grad(loss, argnums=(0, 1))(x, w)))(x, w)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """available() asked again, in an empty cache; the module's state is restored afterwards."""
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path))
    onednn.available.cache_clear()
    ops._onednn_usable.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    onednn.available.cache_clear()
    ops._onednn_usable.cache_clear()


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_available_here():
    # requirements.txt installs oneDNN; the test machine has a C++ compiler.
    assert onednn.available(), onednn.unavailable_reason()


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
@pytest.mark.parametrize(
    ("shape", "k", "c_out", "strides", "padding"),
    [
        ((2, 17, 13, 3), 3, 5, (1, 1), "SAME"),  # the U-Net's first conv: 3 input channels
        ((1, 12, 16, 16), 3, 16, (1, 1), "SAME"),
        ((2, 16, 15, 8), 3, 4, (2, 2), "SAME"),  # strided, odd width
        ((1, 9, 7, 4), 3, 6, (1, 1), [(0, 2), (1, 0)]),  # uneven padding
        ((2, 10, 10, 6), 5, 3, (1, 2), "VALID"),
        ((3, 8, 8, 4), 1, 4, (1, 1), "VALID"),
        ((1, 1, 1, 1), 3, 1, (1, 1), "SAME"),  # one pixel, one channel: only the centre tap meets it
        ((3, 7, 1, 13), 3, 7, (2, 2), "SAME"),  # 1 pixel wide, odd channel counts
        ((1, 1, 9, 5), 3, 13, (1, 3), [(0, 2), (1, 1)]),  # 1 pixel tall, the lower rows padding only
    ],
)
def test_matches_lax(shape, k, c_out, strides, padding):
    x, w = random(0, shape), random(1, (k, k, shape[-1], c_out))
    ref = value_and_grads(lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN), x, w)
    pads = tuple(onednn.padding_pairs(padding, shape[1:3], (k, k), strides))
    got = value_and_grads(lambda x, w: onednn.conv(x, w, strides, pads), x, w)
    for name, g, r in zip(("value", "dx", "dw"), got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()), err_msg=name)


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_calls_from_several_threads_at_once():
    # The handlers share one scratchpad and one kernel buffer between calls (one call at a time):
    # convolutions of different sizes started from four threads at once keep their own values.
    import concurrent.futures

    assert onednn.available(), onednn.unavailable_reason()  # registers the handlers in this process
    cases = []
    for seed, (shape, c_out) in enumerate((((2, 24, 20, 16), 32), ((1, 12, 10, 64), 8))):
        x, w = random(seed, shape), random(seed + 10, (3, 3, shape[-1], c_out))
        # Jitted once here: value_and_grads jits a new function at every call.
        f = jax.jit(lambda x, w: value_and_grads(lambda x, w: onednn.conv(x, w, (1, 1), ((1, 1), (1, 1))), x, w))
        cases.append((f, x, w, [np.asarray(a) for a in f(x, w)]))

    def run(i):
        f, x, w, want = cases[i % 2]
        for _ in range(15):
            for g, r in zip(f(x, w), want):
                np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(run, range(4)))


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_seam_uses_onednn_only_where_it_applies():
    x, w = random(0, (1, 8, 8, 4)), random(1, (3, 3, 4, 4))
    conv = ops.conv_fn("auto")
    call = lambda x, w, **kw: conv(x, w, (1, 1), "SAME", dimension_numbers=DN, **kw)  # noqa: E731
    grad = jax.value_and_grad(lambda x, w: call(x, w).sum(), argnums=(0, 1))
    text = hlo(grad, x, w)
    for target in ("fcn_onednn_conv_fwd", "fcn_onednn_conv_bwd_data", "fcn_onednn_conv_bwd_weights"):
        assert target in text
    # bfloat16 where oneDNN has fast code for it here (tests/test_onednn_bf16.py); not for float16,
    # dilation, groups, NCHW, or code traced to run elsewhere.
    bf16 = jnp.bfloat16
    assert ("fcn_onednn" in hlo(call, x.astype(bf16), w.astype(bf16))) == onednn.supports(bf16)
    assert "fcn_onednn" not in hlo(call, x.astype(jnp.float16), w.astype(jnp.float16))
    assert "fcn_onednn" not in hlo(lambda x, w: call(x, w, rhs_dilation=(2, 2)), x, w)
    assert "fcn_onednn" not in hlo(lambda x, w: call(x, w[:, :, :2], feature_group_count=2), x, w)
    nchw = lambda x, w: conv(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NCHW"))  # noqa: E731
    assert "fcn_onednn" not in hlo(nchw, x.transpose(0, 3, 1, 2), w)
    with ops.portable():
        assert "fcn_onednn" not in hlo(call, x, w)
    assert "fcn_onednn" not in hlo(lambda x, w: ops.conv_fn("gemm")(x, w, (1, 1), "SAME", dimension_numbers=DN), x, w)


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
@pytest.mark.parametrize("impl", ["onednn", "auto", "gemm"])
@pytest.mark.parametrize("kind", ["1x1", "transposed 2x2, stride 2"])
def test_pixelwise_products_go_to_onednn_with_it(kind, impl):
    # The 1x1 head and the upsampling's product: oneDNN 1x1 convolutions with "onednn" and "auto"
    # (XLA:CPU ran their weight gradients on one core), matrix products with "gemm".
    x = random(0, (2, 6, 8, 4))
    if kind == "1x1":
        w, kw = random(1, (1, 1, 4, 3)), dict(padding="VALID")
    else:
        w, kw = random(1, (2, 2, 4, 3)), dict(padding=[(1, 1), (1, 1)], lhs_dilation=(2, 2))
    conv = ops.conv_fn(impl)
    call = lambda x, w: conv(x, w, (1, 1), dimension_numbers=DN, **kw)  # noqa: E731
    text = hlo(jax.value_and_grad(lambda x, w: call(x, w).sum(), argnums=(0, 1)), x, w)
    targets = ("fcn_onednn_conv_fwd", "fcn_onednn_conv_bwd_data", "fcn_onednn_conv_bwd_weights")
    assert all((t in text) == (impl != "gemm") for t in targets)
    assert ("dot_general" in text) == (impl == "gemm")
    ref = value_and_grads(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), dimension_numbers=DN, **kw), x, w)
    for name, g, r in zip(("value", "dx", "dw"), value_and_grads(call, x, w), ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()), err_msg=name)


def test_turned_off(fresh, monkeypatch, caplog):
    monkeypatch.setenv("FCN_ONEDNN", "0")
    with pytest.raises(RuntimeError, match="conv_impl='onednn': FCN_ONEDNN=0"):
        ops.conv_fn("onednn")
    x, w = random(0, (1, 6, 6, 2)), random(1, (3, 3, 2, 2))
    with caplog.at_level(logging.WARNING):
        y = jax.jit(lambda x, w: ops.conv_fn("auto")(x, w, (1, 1), "SAME", dimension_numbers=DN))(x, w)
    np.testing.assert_allclose(y, lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN), rtol=1e-5)
    assert "oneDNN" not in caplog.text  # turned off on purpose: no warning
    with pytest.raises(RuntimeError, match="fcn_onednn_conv_fwd cannot run: FCN_ONEDNN=0"):
        onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)))  # called directly: the reason, not XLA's NOT_FOUND
    with pytest.raises(RuntimeError, match="fcn_onednn_bn_relu_fwd cannot run: FCN_ONEDNN=0"):
        onednn.bn_relu(x, jnp.ones(2), jnp.zeros(2), 1e-5)


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_direct_calls_first_thing_in_a_process_load_the_handlers():
    # No available() beforehand, as in a notebook that imports fcn.onednn and calls it.
    code = (
        "import jax.numpy as jnp, numpy as np; from jax import lax; from fcn import onednn\n"
        "x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 6, 2), np.float32))\n"
        "w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 2, 2), np.float32))\n"
        "y = onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)))\n"
        "ref = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
        "np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)\n"
        "print('ok', onednn.bn_relu(x, jnp.ones(2), jnp.zeros(2), 1e-5)[0].shape)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok (1, 6, 6, 2)" in done.stdout


def test_config_asking_for_onednn_where_it_is_off_is_refused(fresh, monkeypatch):
    from fcn.config import ConfigError, default_config, validate

    monkeypatch.setenv("FCN_ONEDNN", "0")
    config = default_config()
    config.model.conv_impl = "onednn"
    with pytest.raises(ConfigError, match="conv_impl='onednn': FCN_ONEDNN=0.*conv_impl='auto'"):
        validate(config)
    config.model.conv_impl = "auto"
    validate(config)  # falls back, no error


def test_missing_library_falls_back_with_a_warning(fresh, monkeypatch, caplog):
    monkeypatch.setenv("FCN_ONEDNN_ROOT", str(fresh / "nowhere"))
    x, w = random(0, (1, 6, 6, 2)), random(1, (3, 3, 2, 2))
    with caplog.at_level(logging.WARNING):
        text = hlo(lambda x, w: ops.conv_fn("auto")(x, w, (1, 1), "SAME", dimension_numbers=DN), x, w)
    assert "fcn_onednn" not in text
    assert "no oneDNN under" in caplog.text and "nowhere" in caplog.text and "onednn-cpu-gomp" in caplog.text
    with pytest.raises(RuntimeError, match="no oneDNN under"):
        ops.conv_fn("onednn")


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_failed_build_leaves_nothing_behind(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    assert not onednn.available()
    assert "compiling onednn_conv.cc failed" in onednn.unavailable_reason()
    assert list((fresh / "ext").iterdir()) == []  # no half-written library


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_failure_in_one_source_names_it(fresh, monkeypatch):
    """The sources compile side by side: a failure in the second is reported as its own."""
    wrapper = fresh / "cxx.sh"
    wrapper.write_text('#!/bin/sh\ncase "$*" in *onednn_bn.cc*) echo "bn broke" >&2; exit 3;; esac\nexec g++ "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    assert not onednn.available()
    assert "compiling onednn_bn.cc failed" in onednn.unavailable_reason()
    assert "bn broke" in onednn.unavailable_reason()
    assert list((fresh / "ext").iterdir()) == []


def test_compiler_that_does_not_exist(fresh, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh / "no-such-compiler"))
    assert not onednn.available()
    assert "cannot run the C++ compiler" in onednn.unavailable_reason()
    assert "no-such-compiler" in onednn.unavailable_reason()


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_built_once_then_loaded(fresh):
    assert onednn.available(), onednn.unavailable_reason()
    built = list((fresh / "ext").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    onednn.available.cache_clear()
    assert onednn.available()
    assert list((fresh / "ext").iterdir()) == built and built[0].stat().st_mtime_ns == stamp


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_cache_folder_that_cannot_be_written(fresh, monkeypatch):
    blocker = fresh / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FCN_CACHE_DIR", str(blocker))
    assert not onednn.available()
    assert "cannot build the oneDNN convolutions in" in onednn.unavailable_reason()
    assert str(blocker) in onednn.unavailable_reason()
    assert blocker.read_text() == "a file where the cache folder should be"  # untouched


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_stale_temporaries_of_killed_builds_are_removed(fresh):
    ext = fresh / "ext"
    ext.mkdir()
    old, recent = ext / "onednn_conv-x.so.abc.tmp", ext / "onednn_conv-x.so.def.tmp"
    foreign = ext / "notes.tmp"  # not a build's: left alone, however old
    for f in (old, recent, foreign):
        f.write_bytes(b"half a library")
    os.utime(old, (0, 0))
    os.utime(foreign, (0, 0))
    assert onednn.available(), onednn.unavailable_reason()
    assert not old.exists() and recent.exists()  # a recent one may be another process's build
    assert foreign.exists()


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_conv_bias_relu_matches_lax():
    assert onednn.available(), onednn.unavailable_reason()  # registers the handlers in this process
    x, w, b = random(0, (2, 9, 11, 5)), random(1, (3, 3, 5, 6)), random(2, (6,))
    pads = ((1, 1), (1, 1))

    def ref(x, w, b):
        return jax.nn.relu(lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=DN) + b)

    r = random(9, (2, 9, 11, 6))
    both = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * r), argnums=(0, 1, 2)))(x, w, b)  # noqa: E731
    (v, grads), (v_ref, grads_ref) = both(lambda x, w, b: onednn.conv_bias_relu(x, w, b, (1, 1), pads)), both(ref)
    assert (np.asarray(ref(x, w, b)) == 0).mean() > 0.3  # the ReLU has work to do
    np.testing.assert_allclose(v, v_ref, rtol=1e-4)
    for name, g, want in zip(("dx", "dw", "db"), grads, grads_ref):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()), err_msg=name)


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_inference_folds_batch_norm_into_the_onednn_convolutions():
    from flax import nnx

    from fcn.model import UNet

    def build(conv):
        model = UNet(3, features=4, depth=2, rngs=nnx.Rngs(0), conv_general_dilated=conv)
        norms = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.BatchNorm)]
        for i, bn in enumerate(norms):  # running statistics other than the initial 0 and 1
            bn.mean.set_value(0.1 * random(2 * i, bn.mean.shape))
            bn.var.set_value(0.5 + jnp.abs(random(2 * i + 1, bn.var.shape)))
        model.eval()
        return model

    x = jnp.asarray(np.random.default_rng(0).random((2, 20, 28, 3), np.float32))
    fused, plain = build(ops.conv_fn("auto")), build(None)
    assert "fcn_onednn_conv_bias_relu" in hlo(lambda x: fused(x), x)
    np.testing.assert_allclose(fused(x), plain(x), rtol=1e-4, atol=1e-4)
    fused.train()  # batch statistics: not folded
    graph, state = nnx.split(fused)
    assert "fcn_onednn_conv_bias_relu" not in hlo(lambda s, x: nnx.merge(graph, s)(x), state, x)


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
@pytest.mark.parametrize("impl", ["auto", "onednn", "gemm", "xla"])
def test_training_batch_norms_go_to_onednn_with_the_convolutions(impl):
    # Every batch norm + ReLU of the U-Net in training, and its gradient: one oneDNN call each where
    # the convolutions are oneDNN's; none where they are not.
    from flax import nnx

    from fcn.model import UNet

    model = UNet(3, features=4, depth=2, rngs=nnx.Rngs(0), conv_general_dilated=ops.conv_fn(impl))
    num_norms = sum(isinstance(v, nnx.BatchNorm) for _, v in nnx.iter_graph(model))
    graph, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(0).random((2, 20, 28, 3), np.float32))
    text = hlo(jax.grad(lambda s, x: nnx.merge(graph, s)(x).sum()), state, x)
    expected = num_norms if impl in ("auto", "onednn") else 0
    assert num_norms == 10
    assert text.count("@fcn_onednn_bn_relu_fwd(") == text.count("@fcn_onednn_bn_relu_bwd(") == expected


def fake_compile(calls):
    """onednn_build._compile writing a stand-in library (a real build takes 12-13 s on two cores)."""

    def compile_(compiler, root, lib, objs, out):
        calls.append(out)
        with open(out, "wb") as f:
            f.write(b"a library")

    return compile_


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_libraries_of_old_sources_are_removed_once_unused_for_a_week(fresh, monkeypatch):
    from fcn import onednn_build

    calls = []
    monkeypatch.setattr(onednn_build, "_compile", fake_compile(calls))
    ext = fresh / "ext"
    ext.mkdir()
    week_old, recent = ext / "onednn_conv-0123456789abcdef0123.so", ext / "onednn_conv-fedcba9876543210fedc.so"
    # A build in progress in another process, and files that are not fcn's libraries: never touched.
    others = [ext / "onednn_conv-fedcba9876543210fedc.so.x1y2.tmp", ext / "mine.so", ext / "onednn_conv-mine.so"]
    for f in (week_old, recent, *others):
        f.write_bytes(b"x")
        os.utime(f, (0, 0) if f != recent else None)
    os.utime(others[0], None)  # written to now
    os.utime(recent, (time.time() - 6 * 86400,) * 2)  # another environment's, used six days ago

    built = onednn_build.build(onednn_build.onednn_root())
    assert len(calls) == 1 and built.read_bytes() == b"a library"
    assert not week_old.exists()
    assert sorted(p.name for p in ext.iterdir()) == sorted(p.name for p in (built, recent, *others))

    # Found, not built: marked used (its mtime) once it is more than a day old, and the sweep runs again.
    os.utime(built, (time.time() - 3 * 86400,) * 2)
    os.utime(recent, (time.time() - 8 * 86400,) * 2)
    assert onednn_build.build(onednn_build.onednn_root()) == built and len(calls) == 1
    assert time.time() - built.stat().st_mtime < 60
    assert not recent.exists() and all(f.exists() for f in others)


@pytest.mark.skipif(not CPU, reason="oneDNN's convolutions are XLA:CPU custom calls")
def test_library_removed_between_finding_and_loading_it_is_built_again(fresh, monkeypatch):
    from fcn import onednn_build

    calls, loaded = [], []
    monkeypatch.setattr(onednn_build, "_compile", fake_compile(calls))
    monkeypatch.setattr(onednn, "_register", lambda lib: None)

    def cdll(path):
        if not loaded:  # another process's sweep unlinks it just before this one loads it
            os.unlink(path)
            loaded.append(None)
            raise OSError(f"{path}: cannot open shared object file: No such file or directory")
        loaded.append(path)
        return object()

    monkeypatch.setattr(onednn.ctypes, "CDLL", cdll)
    assert onednn.available(), onednn.unavailable_reason()
    assert len(calls) == 2 and os.path.exists(loaded[-1])
