"""A workdir's config.json as fcn reads it (`read`): every reader of a workdir (fcn.evaluate, fcn.predict,
fcn.export, fcn.load through `checkpoint.load_config`, and a resumed run's checks) gets the same dict.

- FIRST_FIELDS: the fields of fcn's first config, which every config.json since has. One missing is a file
  edited by hand or damaged, not an older run's: one error naming the file and the fields, where
  ml_collections' AttributeError, from wherever one was first read, named neither.
- LATER_FIELDS: the fields added since, each with what a run written before it did, filled in where a
  config.json has none (an older run's). tests/test_config_fields.py checks that the two name every field of
  fcn.config.default_config(): a new field goes in LATER_FIELDS.
"""

from __future__ import annotations

from pathlib import Path

FIRST_FIELDS = {
    "": "seed batch_size num_steps eval_every eval_batch_size eval_hflip log_every checkpoint_every keep_checkpoints",
    "data": "source path url sha256 train_split eval_split class_names value_map color_map ignore_label val_fraction"
    " skip_bad tfds_name tfds_image_key tfds_mask_key tfds_splits synthetic_size synthetic_counts max_size"
    " decode_workers",
    "augment": "crop_size scale_range hflip brightness contrast saturation",
    "model": "features depth norm upsample head bottleneck dropout dtype pad_mode",
    "loss": "class_weights dice_weight",
    "optimizer": "name learning_rate warmup_steps schedule weight_decay momentum grad_clip ema_decay",
}

# A field added later: the value that does what runs before it did (the network at the image's size, XLA's
# convolutions, the unfused loss, the split decoded into memory and not cached).
LATER_FIELDS = {
    "data.cache_decoded": False,
    "data.storage": "memory",
    "data.max_memory_gb": 4.0,
    "data.prefetch": 4,
    "model.input_scale": 1.0,
    "model.conv_impl": "xla",
    "loss.fused_head": "off",
}


def read(path: Path) -> dict:
    """The config.json at `path`: checked for FIRST_FIELDS, then LATER_FIELDS filled in where it has none."""
    from fcn.checkpoint import read_json  # (fcn.checkpoint imports this module)

    saved = _checked(read_json(path), path)
    for dotted, value in LATER_FIELDS.items():
        section, key = dotted.split(".")
        saved[section].setdefault(key, value)
    return saved


def _checked(saved: dict, path: Path) -> dict:
    """`saved`, read from `path`, once it has every one of FIRST_FIELDS; else a CheckpointError naming the
    file and the fields it lacks."""
    missing = []
    for section, keys in FIRST_FIELDS.items():
        fields = saved.get(section) if section else saved
        prefix = f"{section}." if section else ""
        missing += [prefix + key for key in keys.split() if not isinstance(fields, dict) or key not in fields]
    if missing:
        from fcn.checkpoint import CheckpointError  # (fcn.checkpoint imports this module)

        raise CheckpointError(
            f"{path} lacks {', '.join(sorted(missing))}: restore it from a copy, or add what it lacks with the "
            "values the run was trained with (its config file's)"
        )
    return saved
