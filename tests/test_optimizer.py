"""The optimizer and its schedule (fcn.state) against hand computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from fcn import state as state_lib
from fcn.config import ConfigError, validate


def _reference_rate(step: int, peak: float, warmup: int, num_steps: int, schedule: str) -> float:
    """Linear warmup from 0 to the peak over `warmup` steps, then cosine to 0 at num_steps (or constant)."""
    if step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    t = min(1.0, (step - warmup) / max(num_steps - warmup, 1))
    return peak * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 3, 10])
def test_learning_rate_schedule_matches_hand_computation(schedule, warmup):
    """warmup_steps=0 is no warmup: the peak rate at step 0 (the cosine schedule used to give 0 there,
    a step that changed nothing, and then reached the peak at step 1)."""
    config = tiny.get_config()
    config.optimizer.schedule, config.optimizer.warmup_steps, config.num_steps = schedule, warmup, 10
    rate = state_lib.learning_rate_schedule(config)
    got = [float(rate(s)) for s in range(config.num_steps + 1)]
    want = [_reference_rate(s, 1e-3, warmup, config.num_steps, schedule) for s in range(config.num_steps + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("name", "value"), [("momentum", 1.0), ("momentum", -0.5), ("ema_decay", 1.0)])
def test_a_decay_of_one_or_more_or_below_zero_is_refused(name, value):
    """SGD's momentum of 1 sums the gradients for ever (the steps grow without end), and went unchecked."""
    config = tiny.get_config()
    config.optimizer.name = "sgd"
    config.optimizer[name] = value
    with pytest.raises(ConfigError, match=rf"config\.optimizer\.{name}={value!r} must be in \[0, 1\)"):
        validate(config)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_moves_the_kernels_only(name):
    """With zero gradients only weight decay moves parameters: every kernel (4-D), no bias or norm scale."""
    config = tiny.get_config()
    config.optimizer.name, config.optimizer.weight_decay = name, 0.5
    config.optimizer.schedule, config.optimizer.warmup_steps = "constant", 0
    _, state, tx = state_lib.create(config, 3)
    params = state["params"]
    # one compiled update: op by op, AdamW's update compiled some hundred small programs (9-14 s on 2 cores)
    updates = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])(params)
    moved = {jax.tree_util.keystr(k): bool(jnp.any(u != 0)) for k, u in jax.tree_util.tree_leaves_with_path(updates)}
    kernels = {k for k in moved if "kernel" in k}
    assert kernels and {k for k, m in moved.items() if m} == kernels


def test_ema_is_the_bias_corrected_average_of_trained_weights_and_grad_norm_is_before_clipping():
    """ema_t = m_t / (1 - d^t), m_t = d * m_{t-1} + (1 - d) * params_t from m_0 = 0 (Adam's bias correction): the
    initial, random weights count for nothing. It was d * ema_{t-1} + (1 - d) * params_t from the initial weights,
    which at d = 0.999 held 37% of them at step 1000 and 22% at 1500 (the recipe's first evaluation, a short
    ablation run). The logged gradient norm is that of the gradients before the global-norm clip."""
    config = tiny.get_config()
    config.optimizer.ema_decay, config.optimizer.grad_clip = 0.999, 1e-3
    config.optimizer.schedule, config.optimizer.warmup_steps = "constant", 0
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 24, 32, 3), np.uint8)
    labels = rng.integers(0, 3, (4, 24, 32), np.uint8)
    sizes = np.full((4, 2), (24, 32), np.int32)
    graphs, state, tx = state_lib.create(config, 3)
    step = state_lib.jit_train_step(config, graphs, tx, 3, 255)
    d, m, trained = 0.999, jax.tree.map(lambda p: np.zeros(p.shape, np.float64), state["params"]), []
    for t in range(1, 4):
        state, out = step(state, images, labels, sizes)
        trained.append(jax.tree.map(np.asarray, state["params"]))
        m = jax.tree.map(lambda a, p: d * a + (1 - d) * p.astype(np.float64), m, trained[-1])
        want = jax.tree.map(lambda a, t=t: a / (1 - d**t), m)
        for got, w in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
        assert float(out["grad_norm"]) > 10 * config.optimizer.grad_clip
    # d = 0.999: the three steps' weights count about a third each, so the EMA is near their mean
    first = jax.tree.leaves(trained[0])
    mean = [np.mean(ws, axis=0) for ws in zip(*map(jax.tree.leaves, trained), strict=True)]
    for got, w in zip(jax.tree.leaves(state["ema"]), mean, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-3, atol=1e-5)
    assert any(np.abs(f - w).max() > 1e-4 for f, w in zip(first, mean, strict=True))  # the steps moved the weights


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_a_warmup_as_long_as_the_run_is_warned_about_naming_both(schedule, caplog):
    """warmup_steps >= num_steps: the rate never reaches its peak (and the cosine never decays); it trained
    without a word. One step shorter, the last step runs at the peak: no warning."""
    config = tiny.get_config()
    config.optimizer.schedule, config.optimizer.warmup_steps, config.num_steps = schedule, 100, 50
    with caplog.at_level("WARNING", logger="fcn.config"):
        validate(config)
    rate = state_lib.learning_rate_schedule(config)
    last = float(rate(config.num_steps - 1))  # what the last step runs at (fcn.train logs it so)
    assert last < 0.5 * config.optimizer.learning_rate
    warned = [r.getMessage() for r in caplog.records if "warmup_steps" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert warned[0].startswith(
        "config.optimizer.warmup_steps=100 is not below config.num_steps=50: the learning rate rises for the whole "
        f"run and never reaches its peak, config.optimizer.learning_rate=0.001 (at the last step it is {last:.3g})"
    )
    assert ("cosine decay never begins" in warned[0]) == (schedule == "cosine")
    assert warned[0].endswith("Use --config.optimizer.warmup_steps=5 (a tenth of the run), or 0 for none")
    caplog.clear()
    config.optimizer.warmup_steps = 49
    with caplog.at_level("WARNING", logger="fcn.config"):
        validate(config)
    assert float(rate(config.num_steps - 1)) < float(state_lib.learning_rate_schedule(config)(config.num_steps - 1))
    assert float(state_lib.learning_rate_schedule(config)(config.num_steps - 1)) == pytest.approx(1e-3, rel=1e-2)
    assert "warmup_steps" not in caplog.text
    config.optimizer.warmup_steps, config.num_steps = 2, 2  # a run too short for a tenth of it
    with caplog.at_level("WARNING", logger="fcn.config"):
        validate(config)
    assert (
        caplog.records[-1]
        .getMessage()
        .endswith(
            " (at the last step it is 0.0005)"
            + (", and the cosine decay never begins" if schedule == "cosine" else "")
            + ". Use --config.optimizer.warmup_steps=0 for none"
        )
    )


@pytest.mark.parametrize("momentum", [0.5, 0.0])
def test_momentum_set_for_adamw_is_warned_about(momentum, caplog):
    """optimizer.momentum is SGD's only (fcn.state.make_optimizer): with adamw, the default optimizer, a
    user setting it trained with it ignored, without a word. The default (0.9), or sgd, warn nothing."""
    config = tiny.get_config()
    assert config.optimizer.name == "adamw"
    config.optimizer.momentum = momentum
    with caplog.at_level("WARNING", logger="fcn.config"):
        validate(config)
    warned = [r.getMessage() for r in caplog.records if "momentum" in r.getMessage()]
    assert warned == [
        f"config.optimizer.momentum={momentum!r} has no effect with config.optimizer.name='adamw': only sgd uses "
        "it. Use --config.optimizer.name=sgd to train with it"
    ]
    for name, value in [("sgd", momentum), ("adamw", 0.9)]:
        caplog.clear()
        config.optimizer.name, config.optimizer.momentum = name, value
        with caplog.at_level("WARNING", logger="fcn.config"):
            validate(config)
        assert "momentum" not in caplog.text
