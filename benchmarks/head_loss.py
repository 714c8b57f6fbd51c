"""The fused head and cross-entropy kernel (fcn/head_loss.py) against XLA's unfused head and loss.

    python benchmarks/head_loss.py --batch 16 --size 360 480 --dtype bfloat16   # on a GPU
    python benchmarks/head_loss.py --batch 2 --size 32 48 --features 16 --depth 2 --rounds 2   # anywhere

Side by side in one process, in interleaved rounds (median of `--steps` calls each):
  - the head, the loss, its gradient and the training accuracy alone, on random features at
    the network's padded size: the unfused form (the 1x1 head's logits, cropped, then
    fcn.losses.cross_entropy and the argmax) and the kernel. Their losses, counts and
    gradients must agree (printed); on a CPU the kernel is interpreted, which checks values,
    not speed;
  - fcn's whole training step (fcn.state.jit_train_step: augmentation, network, loss,
    gradient, update) with `config.loss.fused_head` "off" and "on", from the same state.
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
from fcn import head_loss, losses  # noqa: E402

IGNORE = 255


def _head_parts(args, rng):
    """(unfused, fused, inputs): unfused(...) and fused(block, num_warps)(...), each of (features,
    kernel, bias, labels) -> ((loss, correct), grads), jitted."""
    (h, w), c, k = args.size, args.features, args.classes
    m = 2**args.depth
    hp, wp = -(-h // m) * m, -(-w // m) * m
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    x = jnp.asarray(rng.normal(size=(args.batch, hp, wp, c)), dtype)
    kernel = jnp.asarray(rng.normal(size=(1, 1, c, k)) * c**-0.5, jnp.float32)
    bias = jnp.zeros((k,), jnp.float32)
    labels = jnp.asarray(rng.integers(0, k, (args.batch, h, w)).astype(np.uint8))

    def unfused(x, kernel, bias, labels):
        logits = jnp.einsum("bhwc,ck->bhwk", x, kernel.reshape(c, k).astype(dtype)) + bias.astype(dtype)
        logits = logits.astype(jnp.float32)[:, :h, :w]  # as fcn.model.UNet.logits
        loss = losses.cross_entropy(logits, labels, ignore_label=IGNORE)
        return loss, jnp.sum((jnp.argmax(logits, -1) == labels) & (labels != IGNORE)).astype(jnp.float32)

    def fused(block, num_warps):
        def fn(x, kernel, bias, labels):
            return head_loss.linear_head_cross_entropy(
                x, kernel, bias, labels, ignore_label=IGNORE, block=block, num_warps=num_warps
            )

        return grad(fn)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))  # noqa: E731
    return grad(unfused), fused, (x, kernel, bias, labels)


def _train_step(args, fused: str):
    """fn(*batch) -> metrics: fcn's training step with `config.loss.fused_head = fused`, and the batch."""
    step, state, batch = common.fcn_train_step(args, lambda config: setattr(config.loss, "fused_head", fused))
    held = {"state": state}

    def run(*batch):
        held["state"], metrics = step(held["state"], *batch)
        return metrics

    return run, batch


def _ms_per_call(fn, args_, calls: int) -> float:
    jax.block_until_ready(fn(*args_))
    t = time.perf_counter()
    for _ in range(calls):
        out = fn(*args_)
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - t) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_flags(p)
    p.add_argument("--steps", type=int, default=10, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    p.add_argument(
        "--kernels", default="64x4,128x4,128x8,256x4,256x8,512x8", help="the kernel's settings: BLOCKxWARPS,..."
    )
    args = p.parse_args()
    settings = [tuple(map(int, item.split("x"))) for item in args.kernels.split(",")]
    rng = np.random.default_rng(0)
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; batch {args.batch}, {tuple(args.size)}, "
        f"features {args.features}, {args.classes} classes, {args.dtype}",
        flush=True,
    )

    unfused, fused, inputs = _head_parts(args, rng)
    (loss_u, correct_u), grads_u = unfused(*inputs)
    kernels = {f"fused, {b} px x {w} warps": fused(b, w) for b, w in settings}
    for name, fn in list(kernels.items()):
        try:  # a setting Triton cannot compile is named, and the others run on
            (loss_f, correct_f), grads_f = fn(*inputs)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: cannot run: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            del kernels[name]
            continue
        counts = f"correct {int(correct_f)} ({int(correct_u)})"
        print(f"{name}: loss {float(loss_f):.6f} (unfused {float(loss_u):.6f}), {counts}")
        for part, gu, gf in zip(("features", "kernel", "bias"), grads_u, grads_f):
            gu, gf = np.asarray(gu, np.float32), np.asarray(gf, np.float32)
            diff, top = np.max(np.abs(gu - gf)), np.max(np.abs(gu))
            print(f"  gradient of the {part}: largest difference {diff:.3g} (largest value {top:.3g})")

    variants = {"head+loss unfused": (unfused, inputs)}
    variants.update({name: (fn, inputs) for name, fn in kernels.items()})
    if kernels:  # the training step uses the default setting, fcn.head_loss's
        variants["train step, fused_head=off"] = _train_step(args, "off")
        variants["train step, fused_head=on"] = _train_step(args, "on")
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (fn, a) in variants.items():
            times[name].append(_ms_per_call(fn, a, args.steps))
    against = {name: "head+loss unfused" for name in kernels}
    against["train step, fused_head=on"] = "train step, fused_head=off"
    for name, t in times.items():
        line = f"{name:32s} {np.median(t):9.3f} ms ({min(t):.3f}-{max(t):.3f})"
        if name in against:
            r = np.array(times[against[name]]) / np.array(t)
            line += f"   {against[name]} / this, per round: {np.median(r):.3f}x ({r.min():.3f}-{r.max():.3f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
