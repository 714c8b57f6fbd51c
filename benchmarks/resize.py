"""The model's resizes: jax.image.resize against fcn.resize.linear, side by side in one process.

    python benchmarks/resize.py [--config configs/camvid_cpu.py] [--size 360 480] [--batch 4] [--rounds 8]

For a config whose network runs at `model.input_scale` < 1 (configs/camvid_cpu.py: half
size), times in interleaved rounds (median of 3 calls each round):
  - the input's resize to the network's size (antialiased) and the logits' resize back,
    alone, by each;
  - the evaluation step (`fcn.state.make_eval_step`: the network with both resizes, argmax
    and the confusion matrix) with the model's resizes by each, on random images and
    labels of `--size`, with the config's initial state. Both steps' confusion matrices
    must agree;
  - the predictor (`fcn.Segmenter(model).predict` of `--batch` images, as `fcn.load` gives
    it), likewise; both must give the same class maps;
  - the config's network with `model.upsample = "resize"` (bilinear upsampling, then a 3x3
    conv) at its training crop size and batch: its forward pass in evaluation mode, and
    its training step (augmentation, loss, gradient, update) on a random batch.
Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from fcn import model as model_lib, resize, state as state_lib  # noqa: E402
from fcn.inference import Segmenter  # noqa: E402


class _JaxResize:
    """fcn.resize's interface, done by jax.image.resize (what the model used before)."""

    @staticmethod
    def linear(x, size_hw, *, antialias=True):
        b, *_, c = x.shape
        return jax.image.resize(x, (b, *size_hw, c), "linear", antialias=antialias)


def _median_ms(fn, *args, calls: int = 3) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def _upsampling_parts(config, k: int, rng) -> tuple:
    """(forward, x) and (training step, batch) of the config's network with bilinear upsampling,
    traced now with the model's current resize."""
    config = config.copy_and_resolve_references()
    config.model.upsample, config.model.input_scale = "resize", 1.0
    (ch, cw), n = config.augment.crop_size, config.batch_size
    graphs, state, tx = state_lib.create(config, k)
    x = rng.random((n, ch, cw, 3), dtype=np.float32)
    forward = jax.jit(lambda s, x: state_lib.eval_model(graphs, s)(x))
    jax.block_until_ready(forward(state, x))
    batch = (
        rng.integers(0, 256, (n, ch, cw, 3), dtype=np.uint8),
        rng.integers(0, k, (n, ch, cw)).astype(np.uint8),
        np.tile(np.int32([[ch, cw]]), (n, 1)),
    )
    train_step = state_lib.jit_train_step(config, graphs, tx, k, 255)
    held = {"state": jax.tree.map(jnp.copy, state)}  # the step donates its state

    def step(*batch):
        held["state"], metrics = train_step(held["state"], *batch)
        return metrics

    jax.block_until_ready(step(*batch))
    return (forward, state, x), (step, *batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/camvid_cpu.py")
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    config = common.config_file(args.config)
    (h, w), k, b = args.size, args.classes, args.batch
    hs, ws = model_lib.scaled_size(h, w, config.model.input_scale)
    if (hs, ws) == (h, w):
        sys.exit(f"{args.config}: model.input_scale is 1, the model resizes nothing")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    labels = rng.integers(0, k, (b, h, w)).astype(np.uint8)
    graphs, state, _ = state_lib.create(config, k)

    variants = {}
    for name, impl in (("jax.image.resize", _JaxResize), ("fcn.resize.linear", resize)):
        model_lib.resize = impl  # read when the model is traced, just below
        down = jax.jit(lambda x, impl=impl: impl.linear(x, (hs, ws), antialias=True))
        up = jax.jit(lambda x, impl=impl: impl.linear(x, (h, w)))
        step = jax.jit(state_lib.make_eval_step(graphs, k, 255))
        x = jnp.asarray(images, jnp.float32) / 255
        logits = jnp.asarray(rng.random((b, hs, ws, k), dtype=np.float32))
        seg = Segmenter(state_lib.eval_model(graphs, state), batch_size=b)
        confusion = jax.block_until_ready((down(x), up(logits), step(state, images, labels)))[2][0]
        maps = seg.predict(list(images))  # traced now, with this resize
        parts = ((down, x), (up, logits), (step, state, images, labels), (seg.predict, list(images)))
        parts += _upsampling_parts(config, k, rng)
        variants[name] = parts, (np.asarray(confusion), np.stack(maps))
    model_lib.resize = resize
    (_, (cm_a, maps_a)), (_, (cm_b, maps_b)) = variants.values()
    if not (cm_a == cm_b).all() or not (maps_a == maps_b).all():
        sys.exit("the two evaluation steps' confusion matrices, or the predictors' maps, differ")

    labels_of_parts = ("input resize", "logits resize", "evaluation step", f"predict({b} images)")
    labels_of_parts += ("upsample='resize': forward", "upsample='resize': training step")
    times = {(name, part): [] for name in variants for part in range(len(labels_of_parts))}
    for _ in range(args.rounds):
        for name, (parts, _) in variants.items():
            for i, (fn, *fn_args) in enumerate(parts):
                times[name, i].append(_median_ms(fn, *fn_args))
    print(f"{args.config}: {b} x {h} x {w} images, network at {hs} x {ws}, {k} classes; {args.rounds} rounds")
    print(f"load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}; {jax.devices()[0].device_kind}")
    print("| | " + " | ".join(variants) + " | ratio |\n| --- | --- | --- | --- |")
    for i, part in enumerate(labels_of_parts):
        old, new = (np.median(times[name, i]) for name in variants)
        lo, hi = (min(times[name, i]) for name in variants), (max(times[name, i]) for name in variants)
        ranges = [f"{m:.1f} ms ({a:.1f}-{z:.1f})" for m, a, z in zip((old, new), lo, hi)]
        print(f"| {part} | {ranges[0]} | {ranges[1]} | {old / new:.2f}x |")


if __name__ == "__main__":
    main()
