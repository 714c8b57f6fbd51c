"""One 3x3 convolution (forward, weight gradient) at the U-Net's levels: wall time and CPU/wall. Not a test.

    python benchmarks/conv_threads.py
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/conv_threads.py

Batch 8, configs/camvid_cpu.py's first three levels (176 x 240 x 16, 88 x 120 x 32,
44 x 60 x 64). CPU/wall near 1 means the operation ran on one core; near the
core count, on all of them. The second command compiles without XLA:CPU's
YNNPACK fusions (Eigen's convolutions instead); docs/benchmarks.md compares them.
"""

import argparse
import time

import jax
import numpy as np


def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def weight_grad(x, kernel):
    return jax.grad(lambda k: conv(x, k).sum())(kernel)


def bench(name: str, fn, *args, repeats: int = 20) -> None:
    fn = jax.jit(fn)
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    wall, cpu = (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats
    print(f"{name:32s} wall {wall * 1e3:7.2f} ms  cpu/wall {cpu / wall:.2f}")


def main() -> None:
    # No flags: --help says what it measures (it ran the benchmark), anything else is refused.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    rng = np.random.default_rng(0)
    for h, w, c in [(176, 240, 16), (88, 120, 32), (44, 60, 64)]:
        x = rng.random((8, h, w, c), np.float32)
        kernel = rng.random((3, 3, c, c), np.float32)
        bench(f"forward {h}x{w}, {c}->{c}", conv, x, kernel)
        bench(f"weight gradient {h}x{w}, {c}->{c}", weight_grad, x, kernel)


if __name__ == "__main__":
    main()
