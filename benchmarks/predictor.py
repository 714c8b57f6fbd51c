"""The predictor's canvases: bucketed against the image's own padded size, side by side in one process.

    python benchmarks/predictor.py [--config configs/camvid.py] [--size 360 480] [--images 4] [--rounds 7]

`fcn.Segmenter(model).predict` of `--images` random images of `--size` with the config's
network (initial weights, evaluation mode), once with `exact_sizes=0` (every canvas
rounded up to the 64 px bucket: 384 x 512 for CamVid's 360 x 480) and once with the
default (the image's own size rounded up to 2**depth: 368 x 480), in interleaved rounds;
the median and range of each, and the largest difference between their probabilities.
Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from fcn import model as model_lib  # noqa: E402
from fcn.inference import Segmenter  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/camvid.py")
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    config = common.config_file(args.config)
    model = model_lib.from_config(config.model, args.classes, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*args.size, 3), dtype=np.uint8) for _ in range(args.images)]
    variants = {"bucketed (exact_sizes=0)": Segmenter(model, exact_sizes=0), "own size (default)": Segmenter(model)}
    probs = {name: np.stack(seg.predict_proba(images)) for name, seg in variants.items()}  # compiles
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, seg in variants.items():
            t = time.perf_counter()
            seg.predict(images)
            times[name].append(1e3 * (time.perf_counter() - t))
    print(f"{args.config}: {args.images} images of {args.size[0]} x {args.size[1]}; {args.rounds} rounds")
    print(f"load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}; {jax.devices()[0].device_kind}")
    for name, seg in variants.items():
        canvas = seg.traced_shapes[-1][1:3]
        t = times[name]
        print(f"  {name}: canvas {canvas}, {np.median(t):.0f} ms ({min(t):.0f}-{max(t):.0f})")
    (a, b), (ta, tb) = probs.values(), times.values()
    ratio = np.median(ta) / np.median(tb)
    print(f"  ratio of medians {ratio:.2f}x; largest probability difference {np.abs(a - b).max():.1e}")


if __name__ == "__main__":
    main()
