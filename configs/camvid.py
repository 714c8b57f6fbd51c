"""The full CamVid recipe for one GPU, from scratch (no pretrained weights).

    python train.py --config configs/camvid.py --workdir runs/camvid \
        --config.data.path=../shared/datasets/camvid

Full resolution (360 x 480), bfloat16 compute, scale augmentation 0.5-2.0,
median-frequency class weights, EMA of the weights, flip test-time
augmentation at evaluation.

Measured: the recipe's training, not yet: it needs a GPU, and no training run on
one has been made; the README's table will carry the command, hardware, date,
time and val mean IoU once one is. Its speed, in part: the default config's
training step at this batch, size, network and dtype (without this recipe's EMA,
class weights and scale range) ran at 1057 images/s on an NVIDIA H200
(`bash benchmarks/run_gpu.sh`, 2026-11-22; docs/benchmarks.md), which would make
the 6000 steps about 1.5 minutes of steps.
"""

from fcn.config import default_config


def get_config():
    c = default_config()
    c.data.source = "camvid"
    c.model.features = 32
    c.model.depth = 4
    c.model.dtype = "bfloat16"
    c.augment.crop_size = (352, 480)
    c.augment.scale_range = (0.5, 2.0)
    c.loss.class_weights = "median_freq"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 200
    c.optimizer.ema_decay = 0.999
    c.batch_size = 16
    c.num_steps = 6000
    c.eval_every = 1000
    c.eval_batch_size = 8
    c.eval_hflip = True
    c.checkpoint_every = 1000
    c.log_every = 50
    return c
