"""Input pipeline against the training step, in memory and streamed, side by side in one run.

    python benchmarks/pipeline.py --config configs/camvid_cpu.py \
        --data_path ../shared/datasets/camvid [--steps 20] [--rounds 3]

Measures, on the same machine in one process, examples/s (median over
`--rounds` rounds that interleave the variants, so that outside load moves
them alike):
  decode        decoding the training split once (parallel threads), images/s
  in memory     what the host and the augmentation do per step when the split is
                held in memory (batch indices, gather from the canvas, device_put
                on the `data` mesh, the jitted random scale / crop / flip /
                jitter); `host`: the same without the augmentation
  stream        the same when the split is streamed (config.data.storage =
                "stream"): each batch read from the files, decoded, rescaled and
                padded by `data.decode_workers` threads, `data.prefetch` batches
                ahead, then device_put and augmented
  train step    the full jitted training step on in-memory batches, and on
                streamed batches (where decoding and the step share the host)
and prints the ratios pipeline / train step (target: at least 5x). Every
streamed round starts from a fresh stream with nothing decoded ahead, so
prefetching never carries work from one round into the next.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_example_ms(stream, scale: float, n: int = 60) -> tuple[float, float]:
    """Median ms of one thread reading + decoding + checking one example, and of rescaling it."""
    from fcn.data.images import rescale_pair

    read, rescale = [], []
    for i in stream.ids[:n]:
        t = time.perf_counter()
        image, label = stream.examples.read(i)
        read.append(time.perf_counter() - t)
        t = time.perf_counter()
        rescale_pair(image, label, scale)
        rescale.append(time.perf_counter() - t)
    return 1e3 * float(np.median(read)), 1e3 * float(np.median(rescale))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/camvid_cpu.py")
    parser.add_argument("--data_path", default="")
    parser.add_argument(
        "--steps", type=int, default=20, help="steps per pipeline figure (a quarter, 3 or more, per train step figure)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are their median")
    parser.add_argument(
        "--retain_memory", type=int, default=1, help="1: fcn.host_memory.retain_freed_memory(), as train.py"
    )
    args = parser.parse_args(argv)

    from benchmarks import common

    retained = common.retain_freed_memory(args.retain_memory)  # before jax starts its threads
    import jax

    from fcn import sharding, state as state_lib
    from fcn.config import ConfigError, validate_data
    from fcn.data import DataError, get_source, pipeline
    from fcn.data.stream import Stream

    config = common.config_file(args.config)
    if args.data_path:
        config.data.path = args.data_path

    try:  # a wrong --data_path: one line naming it, as train.py says it (the sources' own checks)
        validate_data(config, {"path"})  # a source that reads no path (synthetic) would ignore it
        source = get_source(config.data)
        t = time.perf_counter()
        split = source.load(config.data.train_split)
        decode_s = time.perf_counter() - t
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    memory = pipeline.stack(split, source.ignore_label, config.model.input_scale)
    n_images = len(split)
    del split
    config.data.storage = "stream"
    t = time.perf_counter()
    stream = pipeline.training_data(source, config)  # reads every image and mask header
    scan_s = time.perf_counter() - t
    mesh = sharding.make_mesh()
    b = config.batch_size
    key = jax.random.key(0)
    augment = jax.jit(lambda k, i, lab, s: pipeline.augment(k, i, lab, s, config.augment, source.ignore_label))
    graphs, state, tx = state_lib.create(config, source.num_classes)
    state = jax.device_put(state, sharding.replicated(mesh))
    step_fn = state_lib.jit_train_step(config, graphs, tx, source.num_classes, source.ignore_label)
    counter = iter(range(10**9))  # every batch a new step: no batch is timed twice
    streams = []

    def fresh_stream():
        """A stream of the same examples with nothing pending (the header scan is reused)."""
        for old in streams:
            old.close()
        streams[:] = [
            Stream(
                stream.examples,
                stream.ids,
                stream.sizes_N2,
                ignore_label=source.ignore_label,
                scale=config.model.input_scale,
                workers=int(config.data.decode_workers),
                prefetch=int(config.data.prefetch),
                desc=stream.desc,
            )
        ]

    def host_batch(kind):
        data = memory if kind == "memory" else streams[0]
        return sharding.put_batch(mesh, *data.batch(next(counter), b, config.seed))

    def pipeline_only(kind):
        x, y = augment(key, *host_batch(kind))
        jax.block_until_ready((x, y))

    def host_only(kind):
        jax.block_until_ready(host_batch(kind))

    def train(kind):
        nonlocal state
        state, out = step_fn(state, *host_batch(kind))
        jax.block_until_ready(out["loss"])

    train_steps = max(3, args.steps // 4)
    variants = {  # name: (function of the kind, kind, steps a round)
        "memory": (pipeline_only, "memory", args.steps),
        "memory host": (host_only, "memory", args.steps),
        "stream": (pipeline_only, "stream", args.steps),
        "stream host": (host_only, "stream", args.steps),
        "train": (train, "memory", train_steps),
        "train streamed": (train, "stream", train_steps),
    }
    rates = {name: [] for name in variants}
    try:
        fresh_stream()
        for fn, kind, _ in variants.values():
            fn(kind)  # compile once, outside any round
        for _ in range(args.rounds):
            for name, (fn, kind, steps) in variants.items():
                if kind == "stream":
                    fresh_stream()
                t = time.perf_counter()
                for _ in range(steps):
                    fn(kind)
                rates[name].append(b * steps / (time.perf_counter() - t))
    finally:
        stream.close()
        for s in streams:
            s.close()
    figures = {name: float(np.median(r)) for name, r in rates.items()}
    read_ms, rescale_ms = per_example_ms(stream, config.model.input_scale)
    device = jax.devices()[0]
    d = config.data
    step = figures["train"]
    print(
        f"{args.config}, batch {b}, crop {tuple(config.augment.crop_size)}, input_scale {config.model.input_scale}; "
        f"median of {args.rounds} rounds of {args.steps} (pipeline) / {train_steps} (train) steps"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {device.platform} {device.device_kind}, "
        f"jax {jax.__version__}, load average {os.getloadavg()[0]:.1f}, retained memory {retained}"
    )
    print(f"decode            {n_images / decode_s:8.1f} images/s ({n_images} images in {decode_s:.1f} s, once)")
    print(f"stream start      {scan_s:8.2f} s (image and mask headers of {len(stream)} examples)")
    print(f"in memory         {figures['memory']:8.1f} examples/s (gather + device_put + augmentation)")
    print(f"  host            {figures['memory host']:8.1f} examples/s (gather + device_put only)")
    print(
        f"stream            {figures['stream']:8.1f} examples/s (read + decode + rescale + pad on "
        f"{d.decode_workers} threads, {d.prefetch} batches ahead, + device_put + augmentation)"
    )
    print(f"  host            {figures['stream host']:8.1f} examples/s (without the augmentation)")
    print(
        f"  one example     {read_ms:8.2f} ms read + decode + checks, {rescale_ms:.2f} ms rescale (one thread, median)"
    )
    print(f"train step        {step:8.1f} examples/s (in-memory batches)")
    print(f"train, streamed   {figures['train streamed']:8.1f} examples/s (streamed batches, same step)")
    print(
        f"ratio to the train step: in memory {figures['memory'] / step:.1f}x, stream {figures['stream'] / step:.1f}x; "
        f"training streamed / in memory: {figures['train streamed'] / step:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
