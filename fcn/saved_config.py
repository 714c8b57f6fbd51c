"""What a workdir's config.json must hold: the fields of fcn's first config, which every config.json since
has. One missing is a file edited by hand or damaged, not an older run's (fields added later, such as
model.input_scale, are read with their defaults, and are not here). `checkpoint.load_config` checks them,
so every reader of a workdir (fcn.evaluate, fcn.predict, fcn.export, fcn.load) gets one error naming the
file and the fields, where ml_collections' AttributeError, from wherever one was first read, named neither.
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


def checked(saved: dict, path: Path) -> dict:
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
