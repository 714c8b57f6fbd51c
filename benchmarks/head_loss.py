"""The fused network-end kernel (fcn/head_loss.py) against XLA's unfused head, batch norm and loss.

    python benchmarks/head_loss.py --batch 16 --size 360 480 --dtype bfloat16   # on a GPU
    python benchmarks/head_loss.py --batch 2 --size 32 48 --features 16 --depth 2 --rounds 2   # anywhere

Side by side in one process, in interleaved rounds (`--steps` calls each, mean per call; the
median of the rounds is reported):
  - each mode's part of the network alone, on random inputs at the network's padded size,
    with its gradients and the training accuracy:
    "head": the 1x1 head's logits, cropped, fcn.losses.cross_entropy and the argmax;
    "head+norm": fcn.norm's training batch norm + ReLU before them;
    unfused (as the training step computes them without the kernel) and by the kernel, for
    each `--kernels` setting. Losses, counts and gradients are compared first (printed); a
    setting that does not compile is named and left out. On a CPU the kernel is interpreted,
    which checks values, not speed;
  - fcn's whole training step (fcn.state.jit_train_step: augmentation, network, loss,
    gradient, update) with `config.loss.fused_head` "off", "head" and "head+norm".
Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from fcn import canvas, head_loss, losses, norm  # noqa: E402

IGNORE, EPS = 255, 1e-5


def features_shape(args) -> tuple[int, int, int, int]:
    """The head's input: the batch at the network's padded size (a multiple of 2**depth)."""
    m = 2**args.depth
    return args.batch, canvas.ceil_to(args.size[0], m), canvas.ceil_to(args.size[1], m), args.features


def _parts(args, rng):
    """{mode: (unfused, fused, inputs)}: unfused and fused(**kernel setting) are jitted functions of
    the inputs -> ((loss, correct), gradients of all inputs but the labels)."""
    (h, w), c, k = args.size, args.features, args.classes
    _, hp, wp, _ = features_shape(args)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    x = jnp.asarray(rng.normal(size=(args.batch, hp, wp, c)), dtype)
    kernel = jnp.asarray(rng.normal(size=(1, 1, c, k)) * c**-0.5, jnp.float32)
    bias = jnp.zeros((k,), jnp.float32)
    labels = jnp.asarray(rng.integers(0, k, (args.batch, h, w)).astype(np.uint8))
    scale, shift = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)

    def head(x, kernel, bias, labels):
        logits = jnp.einsum("bhwc,ck->bhwk", x, kernel.reshape(c, k).astype(dtype)) + bias.astype(dtype)
        logits = logits.astype(jnp.float32)[:, :h, :w]  # as fcn.model.UNet.logits
        loss = losses.cross_entropy(logits, labels, ignore_label=IGNORE)
        return loss, jnp.sum((jnp.argmax(logits, -1) == labels) & (labels != IGNORE)).astype(jnp.float32)

    def head_norm(x, scale, shift, kernel, bias, labels):
        return head(norm._bn_relu(x, scale, shift, EPS, x.dtype)[0], kernel, bias, labels)

    def fused(**setting):
        def fn(x, kernel, bias, labels):
            return head_loss.linear_head_cross_entropy(x, kernel, bias, labels, ignore_label=IGNORE, **setting)

        return grad(fn, 3)

    def fused_norm(**setting):
        def fn(x, scale, shift, kernel, bias, labels):
            out, _ = head_loss.linear_head_cross_entropy(
                x, kernel, bias, labels, ignore_label=IGNORE, bn=(scale, shift, EPS), **setting
            )
            return out

        return grad(fn, 5)

    def grad(f, n):
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(n)), has_aux=True))

    return {
        "head": (grad(head, 3), fused, (x, kernel, bias, labels)),
        "head+norm": (grad(head_norm, 5), fused_norm, (x, scale, shift, kernel, bias, labels)),
    }


def parse_setting(item: str) -> dict:
    """'SUBxWARPSxSTEPSxSTAGES' -> fcn.head_loss.linear_head_cross_entropy's keyword arguments."""
    sub, warps, steps, stages = map(int, item.split("x"))
    return dict(sub=sub, num_warps=warps, steps=steps, num_stages=stages)


def describe(setting: dict) -> str:
    return (
        f"{setting['sub']} px x {setting['steps']} steps, {setting['num_warps']} warps, {setting['num_stages']} stages"
    )


def unfused_note(args) -> str | None:
    """Why the training-step rows with fused_head on would run unfused (fcn.state falls back
    quietly where the kernel does not take the features' shape), or None where it applies."""
    shape = features_shape(args)
    if head_loss.fits(shape) is None:
        return (
            f"the kernel does not take features of shape {shape} (fcn.head_loss.fits: 16, 32, 64... channels, "
            "pixels in blocks): the training-step rows with fused_head on run unfused"
        )
    return None


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
    return 1e3 * common.timeit(lambda: [fn(*args_) for _ in range(calls)][-1], jax.block_until_ready) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_flags(p)
    p.add_argument("--steps", type=int, default=10, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median reported)")
    p.add_argument(
        "--kernels",
        default="128x4x1x1,128x4x8x2,128x4x8x3,64x4x8x2,128x8x8x2,256x8x4x2",
        help="the kernel's settings, SUBxWARPSxSTEPSxSTAGES,...: pixels a step, warps, steps an instance, stages",
    )
    p.add_argument("--modes", default="head,head+norm", help="config.loss.fused_head modes to compare")
    args = p.parse_args()
    settings = [parse_setting(item) for item in args.kernels.split(",")]
    modes = args.modes.split(",")
    rng = np.random.default_rng(0)
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; batch {args.batch}, {tuple(args.size)}, "
        f"features {args.features}, {args.classes} classes, {args.dtype}",
        flush=True,
    )

    note = unfused_note(args)
    if note:
        print(note, flush=True)
    variants, against = {}, {}
    for mode, (unfused, fused, inputs) in _parts(args, rng).items():
        if mode not in modes:
            continue
        (loss_u, correct_u), grads_u = unfused(*inputs)
        base = f"{mode} unfused"
        variants[base] = (unfused, inputs)
        for setting in settings:
            name, fn = f"{mode} fused, {describe(setting)}", fused(**setting)
            try:  # a setting Triton cannot compile is named, and the others run on
                (loss_f, correct_f), grads_f = fn(*inputs)
            except Exception as e:  # noqa: BLE001
                print(f"{name}: cannot run: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                continue
            counts = f"correct {int(correct_f)} ({int(correct_u)})"
            print(f"{name}: loss {float(loss_f):.6f} (unfused {float(loss_u):.6f}), {counts}")
            for i, (gu, gf) in enumerate(zip(grads_u, grads_f)):
                gu, gf = np.asarray(gu, np.float32), np.asarray(gf, np.float32)
                diff, top = np.max(np.abs(gu - gf)), np.max(np.abs(gu))
                print(f"  gradient {i}: largest difference {diff:.3g} (largest value {top:.3g})")
            variants[name], against[name] = (fn, inputs), base
    off = "train step, fused_head=off"
    variants[off] = _train_step(args, "off")
    for mode in modes:
        variants[f"train step, fused_head={mode}"] = _train_step(args, mode)
        against[f"train step, fused_head={mode}"] = off

    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (fn, a) in variants.items():
            times[name].append(_ms_per_call(fn, a, args.steps))
    for name, t in times.items():
        line = f"{name:40s} {np.median(t):9.3f} ms ({min(t):.3f}-{max(t):.3f})"
        if name in against:
            r = np.array(times[against[name]]) / np.array(t)
            line += f"   {against[name]} / this, per round: {np.median(r):.3f}x ({r.min():.3f}-{r.max():.3f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
