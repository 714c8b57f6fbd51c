"""The default config, and checks that fail early in words the user can act on.

Any field can be overridden from the command line:

    python train.py --config configs/camvid_cpu.py --workdir runs/x \
        --config.optimizer.learning_rate=1e-3

Config files are Python: `--config FILE` executes FILE (and nothing else) to
get its ConfigDict, so only name config files you trust.
"""

from __future__ import annotations

import difflib
import logging
import math

import ml_collections

from fcn.data.labels import check_labels_config
from fcn.head_loss import FUSED_HEAD
from fcn.model import HEADS, PAD_MODES, UPSAMPLES
from fcn.norm import NORMS


def default_config() -> ml_collections.ConfigDict:
    """Every field, with its default and a comment; configs/*.py override a few."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, data order, augmentation and dropout; 0..2**32-1

    c.data = d = ml_collections.ConfigDict()
    d.source = "synthetic"  # camvid | folder | tfds | synthetic
    d.path = ""  # camvid, folder: dataset root; tfds: data_dir. "": camvid, tfds look it up; folder: required
    d.url = ""  # camvid: archive to download when no copy is found; "" = the public one
    d.sha256 = ""  # camvid: expected SHA-256 of the archive at `url`; "" = not checked
    d.train_split = "train"  # a split the source offers: camvid, folder: train|val|test; tfds, synthetic: keys below
    d.eval_split = "val"  # scored during training; a source without it trains without evaluation (a warning)
    d.class_names = ()  # folder, tfds (a dataset LABEL_MAPS lacks): one name per class, in class-id order
    d.value_map = ml_collections.ConfigDict()  # folder, tfds: raw mask value -> class id, e.g. {"255": 1}
    d.color_map = ()  # folder, tfds: RGB colour per class id, for colour-coded masks; then extra colours value_map maps
    d.ignore_label = 255  # label value that adds nothing to loss or metrics: above every class id, at most 255
    d.val_fraction = 0.1  # folder without a val/ folder: share of images held out as val, in [0, 1); 0 = none
    d.skip_bad = False  # True: skip unreadable files with a warning and a count
    d.tfds_name = "oxford_iiit_pet"  # tfds: dataset name
    d.tfds_image_key = "image"  # tfds: the image feature
    d.tfds_mask_key = "segmentation_mask"  # tfds: the mask feature
    d.tfds_splits = ml_collections.ConfigDict({"train": "train", "val": "test"})  # tfds: split name -> TFDS split
    d.synthetic_size = (96, 128)  # synthetic: image H, W, integers of at least 8
    d.synthetic_counts = ml_collections.ConfigDict({"train": 256, "val": 64})  # synthetic: split name -> images
    d.max_size = 0  # resize so the longer side is at most this (0 = keep); labels nearest; scored unshrunk
    d.decode_workers = 8  # threads decoding files in parallel (once in memory, or each step when streamed)
    # camvid, folder: keep splits decoded in memory also decoded on disk (the folder decoded/ in $FCN_CACHE_DIR,
    # else $XDG_CACHE_HOME/fcn, else ~/.cache/fcn), with the training canvas made from them; reused (memory-mapped)
    # while the files, these settings and fcn's decoding code are unchanged.
    d.cache_decoded = True
    # Training set held decoded in memory ("memory"), or read and decoded from its files each step, a few
    # batches ahead ("stream"); "auto": in memory when loading it fits max_memory_gb (from image headers:
    # the decoded examples, H x W x 4 bytes each, plus the canvas that stays, N x largest H x largest W x 4
    # at model.input_scale). Same batches either way; eval_split is always in memory.
    d.storage = "auto"  # auto | memory | stream
    d.max_memory_gb = 4.0  # storage "auto": bound (GiB) on the memory taken to hold the training set decoded
    d.prefetch = 4  # training set streamed (storage "stream", or "auto" that streams): batches decoded ahead

    c.augment = a = ml_collections.ConfigDict()
    a.crop_size = (96, 128)  # training crop H, W in network pixels (after model.input_scale)
    a.scale_range = (0.5, 2.0)  # random rescale before the crop: (min, max), 0 < min <= max, drawn log-uniformly
    a.hflip = True  # random horizontal flip
    a.brightness = 0.2  # photometric jitter amplitudes, in [0, 1] (0 = off)
    a.contrast = 0.2  # as brightness
    a.saturation = 0.2  # as brightness

    c.model = m = ml_collections.ConfigDict()
    m.features = 32  # channels of the first level, doubled per level
    m.depth = 4  # number of 2x2 downsamplings
    m.norm = "batch"  # batch | group | none
    m.upsample = "transpose"  # transpose | resize
    m.head = "linear"  # linear | stacked | mlp
    m.bottleneck = 0  # >0: 1x1 conv to channels // bottleneck before each conv block's 3x3 conv
    m.dropout = 0.0  # dropout rate at the bottom of the U
    # Compute dtype: float32 | bfloat16 (parameters stay float32). On a CPU with bfloat16 instructions
    # (AVX-512 BF16, AMX; fcn.onednn.supports), bfloat16 trained camvid_cpu's network 2.3-2.7x faster than
    # float32 on a 2-core Xeon with AMX, 1.7-1.9x on a 2-core AMD EPYC without (2026-11-23; README, Speed).
    m.dtype = "float32"
    m.pad_mode = "reflect"  # padding up to a multiple of 2**depth: reflect | symmetric | edge | wrap | constant
    m.input_scale = 1.0  # run the net at this fraction of the input size, in (0, 1]; logits resized back
    m.conv_impl = "auto"  # auto (CPU: onednn if available, else gemm; GPU, TPU: gemm) | onednn | gemm | xla: fcn/ops.py

    c.loss = lo = ml_collections.ConfigDict()
    lo.class_weights = "none"  # none | median_freq | median_freq_sqrt (its square root: milder)
    lo.dice_weight = 0.0  # weight of the soft Dice term added to cross-entropy
    lo.fused_head = "auto"  # auto (Hopper GPU: head+norm, else off) | off | head | head+norm: fcn/head_loss.py

    c.optimizer = o = ml_collections.ConfigDict()
    o.name = "adamw"  # adamw | sgd
    o.learning_rate = 1e-3  # peak learning rate
    o.warmup_steps = 100  # linear warmup from 0 to the peak rate (0 = peak at once); below num_steps, else a warning
    o.schedule = "cosine"  # cosine | constant
    o.weight_decay = 1e-4  # adamw: decoupled; sgd: added to the gradient. Not on 1-D parameters (biases, norm scales)
    o.momentum = 0.9  # sgd only, in [0, 1)
    o.grad_clip = 1.0  # global-norm clip (0 = off)
    o.ema_decay = 0.0  # >0: evaluate an exponential moving average of the weights (bias-corrected: of trained ones)

    c.batch_size = 8  # global batch size, split over all devices: a multiple of the device count
    c.num_steps = 1000  # training steps in all; a resumed run trains on up to it
    c.eval_every = 250  # steps between evaluations on the eval split (0 = only at the end)
    c.eval_batch_size = 4  # global, as batch_size: a multiple of the device count
    c.eval_hflip = False  # test-time augmentation: average logits with the flipped image
    c.log_every = 25  # steps between metrics.jsonl lines (0 = only at checkpoints and the end)
    c.checkpoint_every = 250  # steps between checkpoints (0 = only at evaluations and the end)
    c.keep_checkpoints = 3  # latest checkpoints kept, at least 1 (the best one is kept apart)
    return c


class ConfigError(ValueError):
    """A config value is impossible; the message names the key and what would work."""


def suggest(key: str, valid) -> str:
    """' (did you mean a, b?)' for the closest valid names, or ''."""
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _choice(config, key: str, choices) -> None:
    value = config[key]  # a ConfigDict reads dotted keys: config["model.head"]
    if value not in choices:
        raise ConfigError(f"config.{key}={value!r} is not valid; expected one of {', '.join(map(str, choices))}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive(config, name: str, *, strict: bool = True) -> None:
    value = config[name]
    # not finite: --config.optimizer.learning_rate=nan passed `value <= 0` and trained on NaN weights
    if not _is_number(value) or not math.isfinite(value) or (value <= 0 if strict else value < 0):
        finite = "" if _is_number(value) and math.isfinite(value) else "finite, "
        raise ConfigError(
            f"config.{name}={value!r} must be a {finite}{'positive' if strict else 'non-negative'} number"
        )


def _check_fields(config) -> None:
    """The fields of default_config(), no more, no fewer: a config file's misspelt field would do nothing."""
    default = default_config()
    for section in (None, *(k for k, v in default.items() if isinstance(v, ml_collections.ConfigDict))):
        have, want = (config, default) if section is None else (config[section], default[section])
        name = "config" if section is None else f"config.{section}"
        if not isinstance(have, ml_collections.ConfigDict):
            raise ConfigError(f"{name}={have!r} must be a ConfigDict, as in fcn.config.default_config()")
        unknown, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
        if unknown:
            raise ConfigError(
                f"{name}.{unknown[0]} is not a config field{suggest(unknown[0], want)}; fcn/config.py lists them all"
            )
        if missing:
            raise ConfigError(
                f"{name}.{missing[0]} is missing: a config file's get_config() starts from fcn.config.default_config()"
            )


def validate(config) -> None:
    """Check types and ranges that do not need the data."""
    _check_fields(config)
    validate_data(config)
    _choice(config, "model.norm", NORMS)
    _choice(config, "model.upsample", UPSAMPLES)
    _choice(config, "model.head", HEADS)
    _choice(config, "model.dtype", ("float32", "bfloat16"))
    _choice(config, "model.pad_mode", PAD_MODES)
    _check_conv_impl(config)
    _choice(config, "optimizer.name", ("adamw", "sgd"))
    _choice(config, "optimizer.schedule", ("cosine", "constant"))
    _choice(config, "loss.class_weights", ("none", "median_freq", "median_freq_sqrt"))
    _choice(config, "loss.fused_head", FUSED_HEAD)
    # keep_checkpoints: with none kept, a run could neither resume nor be evaluated at its last step
    _at_least(config, "keep_checkpoints", 1)
    if not _is_int(config.seed) or not 0 <= config.seed < 2**32:
        # numpy's generator of the data order takes no negative seed (the run failed at its first batch), and
        # jax's keys keep the low 32 bits (seeds 0 and 2**32 gave the same weights, another data order)
        raise ConfigError(f"config.seed={config.seed!r} must be an integer in 0..{2**32 - 1}")
    for name in ("optimizer.learning_rate", "batch_size", "eval_batch_size", "num_steps", "model.features"):
        _positive(config, name)
    for name in (
        "optimizer.warmup_steps",
        "optimizer.weight_decay",
        "optimizer.grad_clip",
        "loss.dice_weight",
        "model.bottleneck",
        "model.depth",
        "eval_every",
        "log_every",
        "checkpoint_every",
    ):
        _positive(config, name, strict=False)
    if not 0 < config.model.input_scale <= 1:
        raise ConfigError(f"config.model.input_scale={config.model.input_scale!r} must be in (0, 1]")
    if not 0 <= config.model.dropout < 1:
        raise ConfigError(f"config.model.dropout={config.model.dropout!r} must be in [0, 1)")
    for name in ("optimizer.ema_decay", "optimizer.momentum"):  # at 1 and above, averages never forget
        if not 0 <= config[name] < 1:
            raise ConfigError(f"config.{name}={config[name]!r} must be in [0, 1)")
    for name in ("augment.brightness", "augment.contrast", "augment.saturation"):
        if not 0 <= config[name] <= 1:  # a factor 1 +- amplitude: above 1 it may be negative, a negated image
            raise ConfigError(f"config.{name}={config[name]!r} must be in [0, 1] (0 = off)")
    _check_warmup(config)
    _check_unused_optimizer_fields(config)
    crop = tuple(config.augment.crop_size)
    if len(crop) != 2 or not all(_is_int(v) and v >= 1 for v in crop):
        raise ConfigError(f"config.augment.crop_size={crop!r} must be two positive integers (H, W)")
    scales = tuple(config.augment.scale_range)
    if len(scales) != 2 or not all(_is_number(v) for v in scales) or not 0 < scales[0] <= scales[1]:
        raise ConfigError(f"config.augment.scale_range={scales!r} must be two numbers (min, max), 0 < min <= max")


def _check_warmup(config) -> None:
    """Warn where the warmup (linear from 0, fcn.state.learning_rate_schedule) lasts the whole run: the rate
    never reaches its peak, and the cosine decay never begins. The last step's rate is the schedule's at
    num_steps - 1, so warmup_steps = num_steps - 1 still reaches it."""
    opt, n = config.optimizer, config.num_steps
    if not opt.warmup_steps or opt.warmup_steps < n:
        return
    logging.getLogger(__name__).warning(
        "config.optimizer.warmup_steps=%d is not below config.num_steps=%d: the learning rate rises for the whole "
        "run and never reaches its peak, config.optimizer.learning_rate=%g (at the last step it is %.3g)%s. "
        "Use --config.optimizer.warmup_steps=%s0 for none",
        opt.warmup_steps,
        n,
        opt.learning_rate,
        opt.learning_rate * (n - 1) / opt.warmup_steps,
        ", and the cosine decay never begins" if opt.schedule == "cosine" else "",
        f"{n // 10} (a tenth of the run), or " if n >= 10 else "",
    )


# Fields of config.optimizer that only some optimizers read (fcn.state.make_optimizer): field -> those.
# The others (learning rate, schedule, warmup, weight decay, clipping, EMA) apply to every optimizer.
_OPTIMIZER_ONLY = {"momentum": ("sgd",)}


def _check_unused_optimizer_fields(config) -> None:
    """Warn where a field is set away from its default under an optimizer that does not read it: AdamW's
    moment decays are optax's fixed b1=0.9, b2=0.999, so optimizer.momentum changed nothing, silently."""
    opt, default = config.optimizer, default_config().optimizer
    for field, users in _OPTIMIZER_ONLY.items():
        if opt.name not in users and opt[field] != default[field]:
            logging.getLogger(__name__).warning(
                "config.optimizer.%s=%r has no effect with config.optimizer.name=%r: only %s uses it. "
                "Use --config.optimizer.name=%s to train with it",
                field,
                opt[field],
                opt.name,
                " and ".join(users),
                users[0],
            )


def validate_data(config, keys=None) -> None:
    """Check the types and ranges of config.data's fields: validate() does, and so do the commands that take
    `--config.data.KEY=VALUE` overrides for a trained workdir (fcn.cli.with_data_overrides), whose `keys`
    (the fields they change) are the only ones checked for being read by the source (_check_unread_data)."""
    _choice(config, "data.source", ("camvid", "folder", "tfds", "synthetic"))
    _choice(config, "data.storage", ("auto", "memory", "stream"))
    _positive(config, "data.max_memory_gb")
    _positive(config, "data.max_size", strict=False)
    _at_least(config, "data.decode_workers", 1)
    _at_least(config, "data.prefetch", 0)
    ignore = config.data.ignore_label
    if not _is_int(ignore) or not 0 <= ignore <= 255:
        raise ConfigError(
            f"config.data.ignore_label={ignore!r} must be an integer in 0..255 (labels are 8-bit) above every class id"
        )
    _check_unread_data(config, keys)


# Fields of config.data that only some sources read (fcn/data/*.py, each `*_source`), which say what data that
# is: field -> those sources. Every source reads the others (splits, ignore_label, max_size, decode_workers,
# skip_bad, storage, ...), but for two left out: cache_decoded (tfds and synthetic keep no decoded cache, so its
# one other value, False, is what they do anyway) and synthetic_size and _counts, which configs/tiny.py and
# shapes.py set: `--config configs/tiny.py --config.data.source=camvid` is a tiny model on real data.
_DATA_ONLY = {
    "path": ("camvid", "folder", "tfds"),
    "url": ("camvid",),
    "sha256": ("camvid",),
    "class_names": ("folder", "tfds"),
    "value_map": ("folder", "tfds"),
    "color_map": ("folder", "tfds"),
    "val_fraction": ("folder",),
    **dict.fromkeys(("tfds_name", "tfds_image_key", "tfds_mask_key", "tfds_splits"), ("tfds",)),
}


def _check_unread_data(config, keys=None) -> None:
    """A ConfigError where a field of config.data that config.data.source never reads is set away from its
    default (of `keys` only, when given): `--config.data.class_names='("a","b")'` on CamVid scored CamVid's
    11 classes, and `--config.data.path=DIR` with the default synthetic source trained on shapes, silently."""
    data, default = config.data, default_config().data
    for key, sources in _DATA_ONLY.items():
        if data.source in sources or (keys is not None and key not in keys):
            continue
        if (value := plain(data[key])) != plain(default[key]):
            raise ConfigError(
                f"config.data.{key}={value!r} is read only by data.source={' or '.join(map(repr, sources))}; "
                f"this config's source is {data.source!r}, which would ignore it: leave it out, or set "
                f"config.data.source"
            )


def plain(value):
    """A config value as plain data, to compare or print: a ConfigDict as a dict, a list (config.json's) as a tuple."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return tuple(plain(v) for v in value) if isinstance(value, list | tuple) else value


def _at_least(config, name: str, least: int) -> None:
    value = config[name]
    if not _is_int(value) or value < least:
        raise ConfigError(f"config.{name}={value!r} must be an integer of at least {least}")


def _check_conv_impl(config) -> None:
    from fcn import onednn, ops  # jax and flax: only once a run is being validated

    _choice(config, "model.conv_impl", ops.CONV_IMPLS)
    if config.model.conv_impl == "onednn":
        import jax

        if jax.default_backend() != "cpu":
            raise ConfigError(
                f"config.model.conv_impl='onednn' runs on a CPU; this backend is {jax.default_backend()}: use auto"
            )
        if not onednn.available():
            raise ConfigError(
                f"config.model.conv_impl='onednn': {onednn.unavailable_reason()}"
                " (conv_impl='auto' uses XLA's convolutions instead)"
            )
    if config.model.dtype != "bfloat16" or config.model.conv_impl not in ("auto", "onednn"):
        return
    import jax

    if jax.default_backend() != "cpu" or onednn.supports("bfloat16"):
        return
    why = onednn.unavailable_reason() or f"oneDNN has no fast bfloat16 code for this CPU ({onednn.impls('bfloat16')})"
    if config.model.conv_impl == "onednn":
        raise ConfigError(f"config.model.dtype='bfloat16' with conv_impl='onednn': {why}; use float32")
    logging.getLogger(__name__).warning(
        "config.model.dtype='bfloat16' on this CPU runs on XLA's own convolutions (in training 2.5x slower than "
        "float32 on oneDNN's, on a 2-core Xeon, 2026-11-23; docs/benchmarks.md): %s. model.dtype='float32' is "
        "faster here.",
        why,
    )


def validate_against_source(config, source) -> None:
    """Checks that need the data source but none of its files: class count, ignore label, training split."""
    k = source.num_classes
    if k < 2:
        raise ConfigError(f"the data has {k} class(es); segmentation needs at least 2 (config.data.class_names)")
    check_labels_config(k, config.data.ignore_label, {})  # the ignore label is no class id, for every source
    if config.data.train_split not in source.splits:
        raise ConfigError(
            f"config.data.train_split={config.data.train_split!r}: {source.name} offers no such split; "
            f"it offers {', '.join(source.splits) or 'none'}"
        )


def validate_against_data(config, num_classes: int, train_sizes) -> None:
    """Checks that need the loaded training data: batch and crop sizes (validate_against_source came first)."""
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
        # train_sizes are in network pixels: a model.input_scale below 1 shrank them, and the crop with them
        scale = config.model.input_scale
        at = f", in network pixels at config.model.input_scale={scale:g}" if scale != 1 else ""
        raise ConfigError(
            f"config.augment.crop_size=({crop_h}, {crop_w}) is larger than any training image even at "
            f"the largest scale ({max_h:.0f} x {max_w:.0f}{at}); crops would be mostly padding. "
            "Use a smaller crop_size or a larger augment.scale_range."
        )
