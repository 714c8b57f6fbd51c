"""Time the README's notebook lines in a fresh process: import, build the default U-Net, call it. Not a test.

    python benchmarks/notebook_start.py

Each line of the README's "In a notebook" snippet, in order, with the
seconds it took: `import fcn`, `fcn.UNet(num_classes=11, features=32,
depth=4, ...)` (eagerly, outside jit), `model(x)` on a 1 x 37 x 101 image
and `fcn.predict_proba` at 1 x 360 x 480, then the first call again. No
compilation cache is used: this is what a new notebook pays.
"""

import argparse
import time

if __name__ == "__main__":  # no flags: --help says what it measures (it ran the benchmark), others are refused
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
T0 = time.perf_counter()

import flax.nnx as nnx  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fcn  # noqa: E402


def main() -> None:
    marks = [("imports (flax, jax, fcn)", time.perf_counter() - T0)]
    t = time.perf_counter()

    def mark(name):
        nonlocal t
        now = time.perf_counter()
        marks.append((name, now - t))
        t = now

    model = fcn.UNet(num_classes=11, features=32, depth=4, rngs=nnx.Rngs(0))
    mark("fcn.UNet(num_classes=11, features=32, depth=4)")
    model(jnp.zeros((1, 37, 101, 3))).block_until_ready()
    mark("model(x), x 1 x 37 x 101")
    fcn.predict_proba(model, jnp.zeros((1, 360, 480, 3))).block_until_ready()
    mark("fcn.predict_proba(model, x), x 1 x 360 x 480")
    model(jnp.zeros((1, 37, 101, 3))).block_until_ready()
    mark("model(x) again")
    for name, seconds in marks:
        print(f"{seconds:7.2f} s  {name}")
    print(f"{sum(s for _, s in marks[:4]):7.2f} s  the first four together")


if __name__ == "__main__":
    main()
