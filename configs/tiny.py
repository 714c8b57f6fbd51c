"""A seconds-long config for tests: a width-4 U-Net on a few small synthetic images.

python train.py --config configs/tiny.py --workdir /tmp/tiny
"""

from fcn.config import default_config


def get_config():
    c = default_config()
    c.data.source = "synthetic"
    c.data.synthetic_size = (24, 32)
    c.data.synthetic_counts.train = 16
    c.data.synthetic_counts.val = 5
    c.augment.crop_size = (24, 32)
    c.augment.scale_range = (0.8, 1.25)
    c.model.features = 4
    c.model.depth = 2
    c.optimizer.warmup_steps = 2
    c.batch_size = 4
    c.eval_batch_size = 2
    c.num_steps = 6
    c.eval_every = 3
    c.checkpoint_every = 3
    c.log_every = 1
    return c
