"""Config checks that fail early, in words the user can act on.

Config files are Python: `--config FILE` executes FILE (and nothing else) to
get its ConfigDict, so only name config files you trust.
"""

from __future__ import annotations

import difflib

from fcn.model import HEADS, NORMS, UPSAMPLES


class ConfigError(ValueError):
    """A config value is impossible; the message names the key and what would work."""


def suggest(key: str, valid) -> str:
    """' (did you mean a, b?)' for the closest valid names, or ''."""
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _choice(config, key: str, choices) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value not in choices:
        raise ConfigError(f"config.{key}={value!r} is not valid; expected one of {', '.join(map(str, choices))}")


def _positive(name: str, value, *, strict: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or (value <= 0 if strict else value < 0):
        raise ConfigError(f"config.{name}={value!r} must be a {'positive' if strict else 'non-negative'} number")


def validate(config) -> None:
    """Check types and ranges that do not need the data."""
    _choice(config, "data.source", ("camvid", "folder", "tfds", "synthetic"))
    _choice(config, "model.norm", NORMS)
    _choice(config, "model.upsample", UPSAMPLES)
    _choice(config, "model.head", HEADS)
    _choice(config, "model.dtype", ("float32", "bfloat16"))
    _choice(config, "optimizer.name", ("adamw", "sgd"))
    _choice(config, "optimizer.schedule", ("cosine", "constant"))
    _choice(config, "loss.class_weights", ("none", "median_freq"))
    for name in ("optimizer.learning_rate", "batch_size", "eval_batch_size", "num_steps", "model.features"):
        _positive(name, config[name.split(".")[0]][name.split(".")[1]] if "." in name else config[name])
    for name in ("optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.grad_clip", "loss.dice_weight", "model.bottleneck", "model.depth"):
        section, field = name.split(".")
        _positive(name, config[section][field], strict=False)
    for name in ("eval_every", "log_every", "checkpoint_every"):
        _positive(name, config[name], strict=False)
    if not 0 <= config.model.dropout < 1:
        raise ConfigError(f"config.model.dropout={config.model.dropout!r} must be in [0, 1)")
    if not 0 <= config.optimizer.ema_decay < 1:
        raise ConfigError(f"config.optimizer.ema_decay={config.optimizer.ema_decay!r} must be in [0, 1)")
    crop = tuple(config.augment.crop_size)
    if len(crop) != 2 or min(crop) < 1:
        raise ConfigError(f"config.augment.crop_size={crop!r} must be two positive sizes (H, W)")
    lo, hi = config.augment.scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f"config.augment.scale_range=({lo}, {hi}) needs 0 < min <= max")


def validate_against_data(config, num_classes: int, train_sizes) -> None:
    """Checks that need the loaded training data: class count, batch and crop sizes."""
    if num_classes < 2:
        raise ConfigError(f"the data has {num_classes} class(es); segmentation needs at least 2 (config.data.class_names)")
    n = len(train_sizes)
    if config.batch_size > n:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {n} training examples of "
            f"config.data.source={config.data.source!r}; use --config.batch_size={max(1, n)} or less"
        )
    crop_h, crop_w = config.augment.crop_size
    max_h = max(h for h, _ in train_sizes) * config.augment.scale_range[1]
    max_w = max(w for _, w in train_sizes) * config.augment.scale_range[1]
    if crop_h > max_h or crop_w > max_w:
        raise ConfigError(
            f"config.augment.crop_size=({crop_h}, {crop_w}) is larger than any training image even at "
            f"the largest scale ({max_h:.0f} x {max_w:.0f}); crops would be mostly padding. "
            "Use a smaller crop_size or a larger augment.scale_range."
        )
