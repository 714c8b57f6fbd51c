"""Defaults shared by every config: each field documented once, here.

Not meant to be trained as is; the configs next to it import `get_config()` and
override a few fields. Any field can be overridden from the command line:

    python train.py --config configs/camvid_cpu.py --workdir runs/x \
        --config.optimizer.learning_rate=1e-3
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, data order, augmentation and dropout

    c.data = d = ml_collections.ConfigDict()
    d.source = "synthetic"  # camvid | folder | tfds | synthetic
    d.path = ""  # dataset root (camvid, folder) or TFDS data_dir; "" = default lookup
    d.url = ""  # camvid: archive to download when no copy is found; "" = the public one
    d.sha256 = ""  # camvid: expected SHA-256 of the archive at `url`; "" = not checked
    d.train_split = "train"
    d.eval_split = "val"
    d.class_names = ()  # folder: one name per class, in class-id order
    d.value_map = ml_collections.ConfigDict()  # folder: raw mask value -> class id, e.g. {"255": 1}
    d.color_map = ()  # folder: RGB colour per class id, for colour-coded masks
    d.ignore_label = 255  # label value that adds nothing to loss or metrics
    d.val_fraction = 0.1  # folder without a val/ folder: share of images held out
    d.skip_bad = False  # True: skip unreadable files with a warning and a count
    d.tfds_name = "oxford_iiit_pet"  # tfds: dataset name
    d.tfds_image_key = "image"
    d.tfds_mask_key = "segmentation_mask"
    d.tfds_splits = ml_collections.ConfigDict({"train": "train", "val": "test"})
    d.synthetic_size = (96, 128)  # synthetic: image H, W
    d.synthetic_counts = ml_collections.ConfigDict({"train": 256, "val": 64})
    d.max_size = 0  # resize so the longer side is at most this (0 = keep); labels nearest
    d.decode_workers = 8  # threads decoding files in parallel

    c.augment = a = ml_collections.ConfigDict()
    a.crop_size = (96, 128)  # training crop H, W (padded with the ignore label when larger)
    a.scale_range = (0.5, 2.0)  # random rescale before the crop
    a.hflip = True
    a.brightness = 0.2  # photometric jitter amplitudes (0 = off)
    a.contrast = 0.2
    a.saturation = 0.2

    c.model = m = ml_collections.ConfigDict()
    m.features = 32  # channels of the first level, doubled per level
    m.depth = 4  # number of 2x2 downsamplings
    m.norm = "batch"  # batch | group | none
    m.upsample = "transpose"  # transpose | resize
    m.head = "linear"  # linear | stacked | mlp
    m.bottleneck = 0  # >0: 1x1 conv to channels // bottleneck before each 3x3 conv
    m.dropout = 0.0  # dropout rate at the bottom of the U
    m.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    m.pad_mode = "reflect"  # how inputs are padded up to a multiple of 2**depth

    c.loss = lo = ml_collections.ConfigDict()
    lo.class_weights = "none"  # none | median_freq
    lo.dice_weight = 0.0  # weight of the soft Dice term added to cross-entropy

    c.optimizer = o = ml_collections.ConfigDict()
    o.name = "adamw"  # adamw | sgd
    o.learning_rate = 1e-3  # peak learning rate
    o.warmup_steps = 100
    o.schedule = "cosine"  # cosine | constant
    o.weight_decay = 1e-4
    o.momentum = 0.9  # sgd only
    o.grad_clip = 1.0  # global-norm clip (0 = off)
    o.ema_decay = 0.0  # >0: evaluate an exponential moving average of the weights

    c.batch_size = 8  # global batch size, split over all devices
    c.num_steps = 1000
    c.eval_every = 250  # steps between evaluations on the eval split (0 = only at the end)
    c.eval_batch_size = 4
    c.eval_hflip = False  # test-time augmentation: average logits with the flipped image
    c.log_every = 25  # steps between metrics.jsonl lines
    c.checkpoint_every = 250
    c.keep_checkpoints = 3  # latest checkpoints kept (the best one is kept apart)
    return c
