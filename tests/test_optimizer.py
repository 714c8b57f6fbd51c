"""The optimizer and its schedule (fcn.state) against hand computations."""

import math

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
