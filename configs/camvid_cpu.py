"""CamVid (11 classes, SegNet split) on a laptop-class CPU: the default of `make train`.

    python train.py --config configs/camvid_cpu.py --workdir runs/camvid_cpu \
        --config.data.path=../shared/datasets/camvid

The network runs at half resolution (model.input_scale = 0.5: 180 x 240) and
its logits are resized back, so evaluation is on the full 360 x 480 val
images against full-resolution labels.

Measured 2026-11-21 with the command above on the 2-core development machine
(AMD EPYC, 24 GiB, no GPU; jax on CPU; nothing else running), on that day's
code (3x3 convolutions by oneDNN, fcn/onednn.py): 1400 steps, 12 min 19 s
for the whole command from empty caches (data decoding, compilation, training,
two full-resolution evaluations, checkpoints), val mean IoU 58.3, pixel
accuracy 89.6% (per class in docs/results.md). Earlier code that rounds
differently reached 57.5 (19 min 38 s, XLA's convolutions), 57.3, 58.4 and 57.5
with the same config: about a point of run-to-run variation. On a slower 2-core
Xeon (2026-11-23, with the augmentation rewritten in fewer operations): 58.3 again,
pixel accuracy 88.8%, in 21 min 2 s; on a 2-core Xeon with AMX (2026-11-23), 58.3 and
88.8% in 11 min 13 s, and in bfloat16 (below) 58.4 and 89.7% in 5 min 2 s. With training crops drawn
over every placement (the last row and column included; the same Xeon, 2026-11-24, one run): 60.3
and 90.6% in 11 min 3 s; again 60.3 and 90.6% in 10 min 25 s on the code of 74e383f (the same Xeon,
2026-11-24, warm caches; docs/results.md).

On a CPU with bfloat16 instructions (AVX-512 BF16 or AMX), `--config.model.dtype=bfloat16` trains
1.7-2.7x as fast (its training steps; the whole 500-step command below 1.6-2x). On a 2-core Xeon
with AMX (2026-11-23), `--config.num_steps=500` took 125 s for the whole command against 247 s in
float32. It reached val mean IoU 41.7 against 41.1, pixel accuracy 85.3% against 84.3%
(docs/benchmarks.md, the twenty-seventh session). On a 2-core AMD EPYC with AVX-512 BF16 but no AMX
(2026-11-23), 228 s against 367 s: val mean IoU 42.6 against 41.8, pixel accuracy 85.6% against
86.0% (the twenty-eighth session).
Without those instructions bfloat16 is slower than float32, and train.py warns.

Export: `python -m fcn.export --workdir runs/camvid_cpu --out exported/camvid --size 360,480`.
The network resizes its input by input_scale, which needs a fixed image size.
"""

from fcn.config import default_config


def get_config():
    c = default_config()
    c.data.source = "camvid"
    c.model.input_scale = 0.5
    c.model.features = 16
    c.model.depth = 4
    c.augment.crop_size = (176, 240)  # network pixels: most of a half-resolution frame
    c.augment.scale_range = (0.75, 1.5)
    c.loss.class_weights = "median_freq_sqrt"
    c.loss.dice_weight = 0.5
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 1e-4
    c.batch_size = 8
    c.num_steps = 1400
    c.eval_every = 700
    c.eval_batch_size = 4
    c.checkpoint_every = 100
    c.log_every = 10
    return c
