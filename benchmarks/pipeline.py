"""Input pipeline against the training step, side by side in one run.

    python benchmarks/pipeline.py --config configs/camvid_cpu.py \
        --data_path ../shared/datasets/camvid [--steps 20]

Measures, on the same machine in one process:
  decode      decoding the training split once (parallel threads), images/s
  pipeline    what the host and the augmentation do per step (batch indices,
              gather from the in-memory canvas, device_put on the `data` mesh,
              the jitted random scale / crop / flip / jitter), examples/s
  train step  the full jitted training step on those batches, examples/s
and prints the ratio pipeline / train step (target: at least 5x), and the share
of a training step the host spends preparing the next batch while the device
is busy (JAX dispatch is asynchronous, so that share is hidden unless it
exceeds the step).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_rate(fn, batch: int, steps: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/camvid_cpu.py")
    parser.add_argument("--data_path", default="")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    import jax

    from fcn import sharding, state as state_lib
    from fcn.data import get_source, pipeline

    spec = importlib.util.spec_from_file_location("bench_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if args.data_path:
        config.data.path = args.data_path

    source = get_source(config.data)
    t = time.perf_counter()
    split = source.load(config.data.train_split)
    decode_s = time.perf_counter() - t
    canvas = pipeline.stack(split, source.ignore_label, config.model.input_scale)
    mesh = sharding.make_mesh()
    b = config.batch_size
    key = jax.random.key(0)
    augment = jax.jit(lambda k, i, lab, s: pipeline.augment(k, i, lab, s, config.augment, source.ignore_label))
    graphs, state, tx = state_lib.create(config, source.num_classes)
    state = jax.device_put(state, sharding.replicated(mesh))
    step_fn = jax.jit(
        state_lib.make_train_step(config, graphs, tx, source.num_classes, source.ignore_label), donate_argnums=0
    )
    counter = iter(range(10**9))

    def host_batch():
        idx = pipeline.batch_indices(next(counter), len(canvas), b, config.seed)
        return sharding.put_batch(mesh, canvas.images_NHWC[idx], canvas.labels_NHW[idx], canvas.sizes_N2[idx])

    def pipeline_only():
        x, y = augment(key, *host_batch())
        jax.block_until_ready((x, y))

    def host_only():
        jax.block_until_ready(host_batch())

    def train():
        nonlocal state
        state, out = step_fn(state, *host_batch())
        jax.block_until_ready(out["loss"])

    pipe = median_rate(pipeline_only, b, args.steps)
    host = median_rate(host_only, b, args.steps)
    step = median_rate(train, b, max(3, args.steps // 4))
    device = jax.devices()[0]
    print(f"{args.config}, batch {b}, crop {tuple(config.augment.crop_size)}, input_scale {config.model.input_scale}")
    print(f"machine: {platform.machine()}, {device.platform} {device.device_kind}, jax {jax.__version__}")
    print(f"decode     {len(split) / decode_s:8.1f} images/s ({len(split)} images in {decode_s:.1f} s, once)")
    print(f"pipeline   {pipe:8.1f} examples/s (host gather + device_put + augmentation)")
    print(f"  host     {host:8.1f} examples/s (gather + device_put only)")
    print(f"train step {step:8.1f} examples/s")
    print(f"ratio pipeline / train step: {pipe / step:.1f}x; host share of a step: {100 * step / host:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
