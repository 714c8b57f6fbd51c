"""The fused head and cross-entropy kernel (fcn/head_loss.py), interpreted on the CPU, against
the unfused head and fcn.losses.cross_entropy; and its lowering to a Triton kernel for a GPU."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from fcn import head_loss, losses, norm, ops, state as state_lib
from fcn.data import get_source

IGNORE = 255
EPS = 1e-5


def _case(dtype=jnp.float32, *, b=2, hp=16, wp=16, c=16, k=11, h=13, w=16, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, hp, wp, c)), dtype)
    kernel = jnp.asarray(rng.normal(size=(1, 1, c, k)) * 0.3, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(k,)) * 0.1, jnp.float32)
    labels = rng.integers(0, k, size=(b, h, w)).astype(np.uint8)
    labels[0, :3] = IGNORE
    labels[1, 0, :2] = (k, 200)  # no class id and not IGNORE: counted nowhere, as fcn.losses counts them
    return x, kernel, bias, jnp.asarray(labels)


def _reference(x, kernel, bias, labels, class_weights=None):
    """What training computes without the kernel: the head's logits, cropped, then the loss."""
    _, h, w = labels.shape
    c, k = kernel.shape[2:]
    logits = jnp.einsum("bhwc,ck->bhwk", x, kernel.reshape(c, k).astype(x.dtype), preferred_element_type=jnp.float32)
    logits = (logits + bias)[:, :h, :w]
    loss = losses.cross_entropy(logits, labels, ignore_label=IGNORE, class_weights_K=class_weights)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) & (labels != IGNORE))
    return loss, correct.astype(jnp.float32)


def _fused(x, kernel, bias, labels, class_weights=None):
    return head_loss.linear_head_cross_entropy(
        x, kernel, bias, labels, ignore_label=IGNORE, class_weights_K=class_weights, interpret=True
    )


def _bn_params(c, seed=2):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32), jnp.asarray(rng.normal(size=c) * 0.2, jnp.float32)


def _reference_bn(x, scale, shift, kernel, bias, labels, class_weights=None):
    """The unfused end of a training network: fcn.norm's batch norm + ReLU (its own gradient), the head, the loss."""
    y, mean, var = norm._bn_relu(x, scale, shift, EPS, x.dtype)
    loss, correct = _reference(y, kernel, bias, labels, class_weights)
    return loss, (correct, mean, var)


def _fused_bn(x, scale, shift, kernel, bias, labels, class_weights=None):
    (loss, correct), (mean, var) = head_loss.linear_head_cross_entropy(
        x,
        kernel,
        bias,
        labels,
        ignore_label=IGNORE,
        class_weights_K=class_weights,
        bn=(scale, shift, EPS),
        interpret=True,
    )
    return loss, (correct, mean, var)


@pytest.mark.parametrize("weighted", [False, True])
def test_values_and_gradients_equal_the_unfused_head_and_loss(weighted):
    x, kernel, bias, labels = _case()
    weights = jnp.asarray(np.random.default_rng(1).uniform(0.2, 3.0, 11), jnp.float32) if weighted else None
    (loss_r, correct_r), grads_r = jax.value_and_grad(_reference, argnums=(0, 1, 2), has_aux=True)(
        x, kernel, bias, labels, weights
    )
    (loss_f, correct_f), grads_f = jax.value_and_grad(_fused, argnums=(0, 1, 2), has_aux=True)(
        x, kernel, bias, labels, weights
    )
    np.testing.assert_allclose(loss_f, loss_r, rtol=1e-6)
    assert float(correct_f) == float(correct_r) > 0
    for name, gf, gr in zip(("features", "kernel", "bias"), grads_f, grads_r):
        assert gf.shape == gr.shape and gf.dtype == gr.dtype, name
        np.testing.assert_allclose(gf, gr, rtol=2e-5, atol=1e-8, err_msg=name)
    # The padded rows (13-15, beyond the labels) get no gradient, as the cropped logits' do not.
    assert not np.any(np.asarray(grads_f[0])[:, 13:])
    # One step of 128 pixels an instance (four instances) against two of 256 (one): the same values.
    (loss_1, correct_1), grads_1 = jax.value_and_grad(
        lambda *a: head_loss.linear_head_cross_entropy(
            *a, labels, ignore_label=IGNORE, class_weights_K=weights, interpret=True, sub=128, steps=1
        ),
        argnums=(0, 1, 2),
        has_aux=True,
    )(x, kernel, bias)
    np.testing.assert_allclose(loss_1, loss_f, rtol=1e-6)
    assert float(correct_1) == float(correct_f)
    for g1, gf in zip(grads_1, grads_f):
        np.testing.assert_allclose(g1, gf, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_with_batch_norm_and_relu_taken_in_as_the_unfused_network_end(dtype):
    x, kernel, bias, labels = _case(dtype, c=32, hp=32, wp=16, h=29, w=16)
    x = x * 2.0 + 0.5  # batch norm's statistics then matter
    scale, shift = _bn_params(32)
    weights = jnp.asarray(np.random.default_rng(1).uniform(0.2, 3.0, 11), jnp.float32)
    args = (x, scale, shift, kernel, bias, labels, weights)
    (loss_r, (correct_r, mean_r, var_r)), grads_r = jax.value_and_grad(_reference_bn, range(5), has_aux=True)(*args)
    (loss_f, (correct_f, mean_f, var_f)), grads_f = jax.value_and_grad(_fused_bn, range(5), has_aux=True)(*args)
    np.testing.assert_allclose(loss_f, loss_r, rtol=1e-6 if dtype == jnp.float32 else 1e-5)
    np.testing.assert_array_equal(mean_f, mean_r)  # fcn.norm.batch_stats, shared
    np.testing.assert_array_equal(var_f, var_r)
    if dtype == jnp.float32:
        assert float(correct_f) == float(correct_r) > 0
    else:
        assert abs(float(correct_f) - float(correct_r)) <= 2  # near ties may round either way
    for name, gf, gr in zip(("input", "scale", "shift", "kernel", "bias"), grads_f, grads_r):
        assert gf.shape == gr.shape and gf.dtype == gr.dtype, name
        gf, gr = np.asarray(gf, np.float32), np.asarray(gr, np.float32)
        if dtype == jnp.float32:
            np.testing.assert_allclose(gf, gr, rtol=1e-4, atol=1e-7 * np.abs(gr).max(), err_msg=name)
        else:
            np.testing.assert_allclose(gf, gr, atol=3e-2 * np.abs(gr).max(), err_msg=name)


def test_bfloat16_features_as_the_bfloat16_head():
    x, kernel, bias, labels = _case(jnp.bfloat16, c=32, hp=32, wp=32, h=30, w=31)
    (loss_r, correct_r), (dx_r, dk_r) = jax.value_and_grad(_reference, argnums=(0, 1), has_aux=True)(
        x, kernel, bias, labels
    )
    (loss_f, correct_f), (dx_f, dk_f) = jax.value_and_grad(_fused, argnums=(0, 1), has_aux=True)(
        x, kernel, bias, labels
    )
    assert dx_f.dtype == jnp.bfloat16 and dk_f.dtype == jnp.float32
    np.testing.assert_allclose(loss_f, loss_r, rtol=1e-5)
    assert abs(float(correct_f) - float(correct_r)) <= 2  # near ties may round either way
    scale = float(jnp.max(jnp.abs(dx_r.astype(jnp.float32))))
    np.testing.assert_allclose(dx_f.astype(jnp.float32), dx_r.astype(jnp.float32), atol=2e-2 * scale)
    np.testing.assert_allclose(dk_f, dk_r, atol=2e-2 * float(jnp.max(jnp.abs(dk_r))))


def test_a_batch_with_every_pixel_ignored_gives_zero_not_nan():
    x, kernel, bias, labels = _case()
    labels = jnp.full_like(labels, IGNORE)
    (loss, correct), grads = jax.value_and_grad(_fused, argnums=(0, 1, 2), has_aux=True)(x, kernel, bias, labels)
    assert float(loss) == 0.0 and float(correct) == 0.0
    assert all(not np.any(np.asarray(g)) for g in grads)


@pytest.mark.parametrize("bn", [False, True], ids=["head", "head+norm"])
def test_every_gradient_scales_with_the_loss_cotangent(bn):
    """The kernel computes its gradients in the forward pass; the backward pass scales each by the loss's
    cotangent. Training's is 1, so an unscaled one went unseen there: a loss scaled, averaged or added to
    another term (here -2.5 x) must still get the unfused gradients."""
    x, kernel, bias, labels = _case()
    if bn:  # input, scale, shift, kernel, bias
        fused, reference, args = _fused_bn, _reference_bn, (x, *_bn_params(16), kernel, bias, labels)
    else:  # features, kernel, bias
        fused, reference, args = _fused, _reference, (x, kernel, bias, labels)
    argnums = range(len(args) - 1)
    grads_f = jax.grad(lambda *a: -2.5 * fused(*a)[0], argnums)(*args)
    grads_r = jax.grad(lambda *a: -2.5 * reference(*a)[0], argnums)(*args)
    for i, (gf, gr) in enumerate(zip(grads_f, grads_r)):
        np.testing.assert_allclose(gf, gr, rtol=1e-4, atol=1e-7 * float(np.abs(gr).max()), err_msg=f"argument {i}")


def test_shapes_the_kernel_cannot_take_are_refused():
    assert head_loss.block_pixels(16 * 368 * 480, 32) == 128  # BLOCK_VALUES / channels
    assert head_loss.block_pixels(16 * 368 * 480, 64) == 64
    assert head_loss.block_pixels(16 * 368 * 480, 128) == 32
    assert head_loss.block_pixels(16 * 368 * 480, 32, 1024) == 1024
    assert head_loss.block_pixels(2 * 24 * 32, 16, 1024) == 512
    assert head_loss.block_pixels(16 * 368 * 480, 24) is None  # not a power of two
    assert head_loss.block_pixels(16 * 368 * 480, 8) is None  # too narrow for Triton's products
    assert head_loss.block_pixels(3 * 5 * 7, 16) is None
    x, kernel, bias, labels = _case(c=8)
    with pytest.raises(ValueError, match="do not suit the fused head kernel"):
        _fused(x, kernel, bias, labels)


H200 = types.SimpleNamespace(platform="gpu", compute_capability="9.0", device_kind="NVIDIA H200")
GPU_8 = types.SimpleNamespace(platform="gpu", compute_capability="8.0", device_kind="NVIDIA A100")
CPU = types.SimpleNamespace(platform="cpu")
TPU = types.SimpleNamespace(platform="tpu")


def test_when_training_uses_it():
    config = tiny.get_config()
    assert config.loss.fused_head == "auto"  # measured on an H200: docs/benchmarks.md, the thirty-second session
    assert head_loss.fused_head_mode(config, H200) == "head+norm"
    assert head_loss.fused_head_mode(config) is None  # this CPU
    assert head_loss.fused_head_mode(config, TPU) is None
    for unmeasured in ("8.0", "10.0", "gfx90a", None):  # an A100, a Blackwell, an AMD GPU, no capability given
        device = types.SimpleNamespace(platform="gpu", compute_capability=unmeasured)
        assert head_loss.fused_head_mode(config, device) is None, unmeasured
    config.loss.fused_head = "head"
    assert head_loss.fused_head_mode(config, CPU) == "head"
    config.loss.fused_head = "head+norm"
    config.model.norm = "group"
    assert head_loss.fused_head_mode(config, H200) == "head"  # only batch norm is taken in
    config.model.norm = "batch"
    config.loss.dice_weight = 0.5  # the Dice term needs the logits
    assert head_loss.fused_head_mode(config, H200) is None
    config.loss.dice_weight = 0.0
    config.model.head = "mlp"
    assert head_loss.fused_head_mode(config, H200) is None
    config.model.head = "linear"
    config.loss.fused_head = "off"
    assert head_loss.fused_head_mode(config, H200) is None
    config.loss.fused_head = "on"
    with pytest.raises(ValueError, match="loss.fused_head='on' is not valid"):
        from fcn.config import validate

        validate(config)


def test_a_jax_without_pallas_triton_trains_unfused_under_auto(monkeypatch):
    """jax 0.11 deprecates Pallas's Triton backend, which the kernel is written for: on a Hopper GPU
    whose jax cannot import it, "auto" is unfused, and a mode named in the config is one ConfigError."""
    import sys

    from jax.experimental import pallas

    from fcn.config import ConfigError

    config = tiny.get_config()
    head_loss.triton_missing.cache_clear()
    for choice in ("off", "auto"):  # an unfused config, and "auto" off Hopper, do not import Triton at all
        config.loss.fused_head = choice
        assert head_loss.fused_head_mode(config, GPU_8) is None
    assert head_loss.triton_missing.cache_info().misses == 0
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # its import raises ImportError
        patch.delattr(pallas, "triton", raising=False)  # (once imported, `from pallas import triton` reads this)
        assert head_loss.fused_head_mode(config, H200) is None
        assert head_loss.fused_head_mode(config, CPU) is None
        config.loss.fused_head = "head"
        assert head_loss.fused_head_mode(config, CPU) == "head"  # interpreted: Triton is not needed
        with pytest.raises(ConfigError, match=r"fused_head='head' needs jax.experimental.pallas.triton, which this"):
            head_loss.fused_head_mode(config, H200)
    head_loss.triton_missing.cache_clear()
    assert head_loss.triton_missing() is None  # this jax has it
    assert head_loss.fused_head_mode(config, H200) == "head"


def test_training_step_with_the_kernel_equals_the_step_without(monkeypatch):
    calls = []
    kernel_call = head_loss.linear_head_cross_entropy
    monkeypatch.setattr(head_loss, "linear_head_cross_entropy", lambda *a, **k: calls.append(1) or kernel_call(*a, **k))
    config = tiny.get_config()
    config.model.features = 16  # the kernel needs 16 channels or more
    config.loss.class_weights = "median_freq"
    split = get_source(config.data).load("train")
    images = np.stack(split.images[:4])
    labels = np.stack(split.labels[:4])
    sizes = np.array([lab.shape for lab in split.labels[:4]], np.int32)
    weights = losses.median_frequency_weights(split.labels, 4)
    # Each step compiled without LLVM's optimisation (the three alike): they run twice, and compiling the
    # interpreted kernel's loops took most of the test at -O2.
    from conftest import FAST_COMPILE  # here: a subprocess below imports this module without tests/ on its path

    fast = dict(FAST_COMPILE)
    fast.update(ops.train_compiler_options(config.model.conv_impl) or {})
    results = {}
    for choice in ("head", "head+norm", "off"):
        config.loss.fused_head = choice
        graphs, state, tx = state_lib.create(config, 4)
        step = state_lib.jit_train_step(config, graphs, tx, 4, IGNORE, weights, compiler_options=fast)
        for _ in range(2):
            state, out = step(state, images, labels, sizes)
        results[choice] = jax.device_get((state["params"], state["rest"], out))
        assert len(calls) == min(len(results), 2)  # traced once with each fused mode, never with "off"
    params_off, rest_off, out_off = results.pop("off")
    for mode, (params, rest, out) in results.items():
        # The second step's loss, after an update from gradients equal to float rounding: 1.01e-5 apart
        # once the crops changed (the augmentation's placement), within the parameters' 1e-4 here.
        np.testing.assert_allclose(out["loss"], out_off["loss"], rtol=5e-5, err_msg=mode)
        np.testing.assert_allclose(out["grad_norm"], out_off["grad_norm"], rtol=1e-4, err_msg=mode)
        assert float(out["train_accuracy"]) == float(out_off["train_accuracy"]), mode
        for a, b in zip(jax.tree.leaves((params, rest)), jax.tree.leaves((params_off, rest_off))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=mode)


SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
from tests.test_head_loss import _bn_params, _case, _fused, _fused_bn, _reference, _reference_bn
from fcn import sharding

assert jax.device_count() == 2
x, kernel, bias, labels = _case(b=4, hp=16, wp=16, c=16, h=13, w=16)
split = NamedSharding(sharding.make_mesh(), P("data"))
x, labels = jax.device_put(x, split), jax.device_put(labels, split)
scale, shift = _bn_params(16)
out = {}
for name, fn, args in (
    ("fused", _fused, (x, kernel, bias, labels)),
    ("reference", _reference, (x, kernel, bias, labels)),
    ("fused_bn", _fused_bn, (x, scale, shift, kernel, bias, labels)),
    ("reference_bn", _reference_bn, (x, scale, shift, kernel, bias, labels)),
):
    step = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args) - 1)), has_aux=True))
    out[name + "_text"] = step.lower(*args).as_text()
    (loss, aux), grads = step(*args)
    correct = aux if name in ("fused", "reference") else aux[0]
    out[name] = [float(loss), float(correct)] + [np.asarray(g, np.float64).ravel().tolist() for g in grads]
print(json.dumps(out))
"""


def test_two_devices_each_run_the_kernel_on_their_share_of_the_batch():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", SHARDED, str(root)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    for variant in ("", "_bn"):
        text = out["fused" + variant + "_text"]
        assert "manual_computation" in text or "SPMDFullToShardShape" in text  # the kernel under shard_map
        assert "manual_computation" not in out["reference" + variant + "_text"]
        fused, reference = out["fused" + variant], out["reference" + variant]
        np.testing.assert_allclose(fused[0], reference[0], rtol=1e-6)
        assert fused[1] == reference[1] > 0
        for gf, gr in zip(fused[2:], reference[2:]):
            np.testing.assert_allclose(gf, gr, rtol=1e-4, atol=1e-7 * np.abs(gr).max())


def test_training_warns_that_a_forced_kernel_is_interpreted_off_a_gpu(tmp_path, caplog):
    from fcn.train import train_and_evaluate

    config = tiny.get_config()
    config.loss.fused_head = "head"
    with caplog.at_level("WARNING", logger="fcn"):
        train_and_evaluate(config, tmp_path, stop_after=1)
    assert any("fused_head='head' on cpu" in r.getMessage() and "interpreter" in r.getMessage() for r in caplog.records)
