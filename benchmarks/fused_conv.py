"""Can a Pallas 3x3 convolution take batch norm in, and keep up with cuDNN? A prototype, timed.

    python benchmarks/fused_conv.py --batch 16 --size 360 480 --dtype bfloat16   # on a GPU
    python benchmarks/fused_conv.py --batch 1 --size 16 16 --features 16 --depth 1 --rounds 1   # anywhere

Issue #6's last target, 40% model FLOPs utilisation on an H200, needs the training step 2.6 ms
shorter (docs/benchmarks.md). cuDNN's convolutions already run at about 61% of the bfloat16
product's rate; the rest of the step is passes over the activations around them: batch norm's
statistics of each conv's output, and its normalisation + ReLU, which XLA cannot fuse into a
cuDNN call. This file times the first pieces of the way to fewer passes, before any of it goes
into fcn: benchmarks/conv_kernels.py's Pallas (Triton) kernels, implicit matrix products over
the nine taps, that apply batch norm + ReLU to a conv's input as they load it (the input is the
previous conv's raw output; the normalised activations are never written), and, for the forward
conv, write each block's per-channel sum and sum of squares of its output beside it (batch
norm's statistics without another pass).
For every 3x3 conv of the network at its padded size, side by side in one process, in
interleaved rounds (`--steps` calls each; median of the rounds):
  - "conv": XLA's convolution alone (cuDNN on a GPU) against the kernel with neither extra;
  - "layer": XLA's (batch norm + ReLU ->) conv -> statistics, as fcn's training step computes
    them, against the kernel with both;
  - "wgrad": XLA's weight gradient (cuDNN's), from the activations the forward pass wrote,
    against the kernel's, which takes batch norm + ReLU in as the forward does;
  - "dgrad": the input gradient, and for a conv after batch norm + ReLU on through them, as
    fcn's training step computes it (cuDNN's, then fcn.norm's batch norm + ReLU gradient: a pass
    for its two sums, a pass for the rest), against the conv kernel over the output gradient
    with the taps flipped, which zeroes it where the ReLU was and writes those two sums beside it,
    then the same last pass (fcn.norm.bn_grad_from_sums).
Values are compared first (printed). A `--kernels` setting that does not compile is named and
left out; each conv's fastest setting counts in the totals. On a CPU the kernels are interpreted:
values, not speed. Not a test, and not used by fcn.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.conv_kernels import (  # noqa: E402
    SETTINGS,
    conv3x3,
    conv3x3_dgrad,
    conv3x3_wgrad,
    conv_flops,
    describe,
    fits,
    network_convs,
    parse_setting,
    stats_from_sums,
)
from benchmarks.head_loss import _ms_per_call  # noqa: E402
from fcn import norm  # noqa: E402

KINDS = ("conv", "layer", "wgrad", "dgrad")
NEEDED_MS = 2.6  # 13.9 ms of kernels a step -> 11.3 (docs/benchmarks.md, the thirty-second session)
EPS = 1e-5  # batch norm's epsilon (nnx.BatchNorm's)


def xla_conv(x_BHWC, w_33IO):
    """The conv as fcn's model runs it off a CPU (XLA's own; cuDNN on a GPU)."""
    return jax.lax.conv_general_dilated(
        x_BHWC, w_33IO.astype(x_BHWC.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def bn_relu(x_BHWC, bn_stats):
    """Batch norm + ReLU as fcn.norm computes them in training, on given statistics."""
    mean, mul, bias = bn_stats
    return jax.nn.relu((x_BHWC - mean) * mul + bias).astype(x_BHWC.dtype)


def xla_layer(x_BHWC, w_33IO, bn_stats=None):
    """(batch norm + ReLU ->) conv -> the output's batch statistics, as XLA computes them in fcn."""
    y = xla_conv(x_BHWC if bn_stats is None else bn_relu(x_BHWC, bn_stats), w_33IO)
    return y, norm.batch_stats(y)


def fused_layer(x_BHWC, w_33IO, bn_stats=None, **setting):
    y, sums = conv3x3(x_BHWC, w_33IO, bn_stats, **setting)
    return y, stats_from_sums(sums, y.size // y.shape[-1])


def xla_wgrad(a_BHWC, g_BHWK, w_33IO):
    """The conv's weight gradient by XLA (cuDNN's on a GPU), from the activations the forward pass
    wrote (batch norm + ReLU's output, for a conv after one)."""
    return jax.vjp(lambda w: xla_conv(a_BHWC, w), w_33IO)[1](g_BHWK)[0]


def xla_dgrad(x_BHWC, g_BHWK, w_33IO, bn_stats=None):
    """The gradient at the conv's input by XLA (cuDNN's on a GPU); with `bn_stats`, on through the batch
    norm + ReLU before it, by fcn.norm's own gradient (its variance taken as 1 - eps, so that `mul` is
    the scale)."""
    dx = jax.vjp(lambda a: xla_conv(a, w_33IO), x_BHWC)[1](g_BHWK)[0]
    if bn_stats is None:
        return dx
    mean, mul, bias = bn_stats
    res = (x_BHWC, mean, jnp.full_like(mean, 1.0 - EPS), mul, bias)
    return norm._bn_relu_bwd(EPS, x_BHWC.dtype, res, (dx, None, None))[0]


def fused_dgrad(x_BHWC, g_BHWK, w_33IO, bn_stats=None, **setting):
    """`xla_dgrad` by the kernel: its output masked by the ReLU and batch norm's two sums written beside it,
    then fcn.norm's last pass."""
    if bn_stats is None:
        return conv3x3_dgrad(g_BHWK, w_33IO, **setting)[0]
    mean, mul, bias = bn_stats
    d, sums = conv3x3_dgrad(g_BHWK, w_33IO, (x_BHWC, mean, mul, bias), **setting)
    return norm.bn_grad_from_sums(x_BHWC, d, mean, jnp.ones_like(mean), mul, sums[0], sums[1])[0]


def _inputs(x_shape, c_out, dtype, rng):
    """x (standing for the previous conv's raw output), weights, batch norm's (mean, mul, bias), and an
    output gradient."""
    b, h, w, c_in = x_shape
    x = jnp.asarray(rng.normal(0.3, 1.5, size=x_shape), dtype)
    wt = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) * (9 * c_in) ** -0.5, jnp.float32)
    mean = jnp.asarray(rng.normal(0.3, 0.1, size=c_in), jnp.float32)
    mul = jnp.asarray(rng.uniform(0.5, 1.0, size=c_in), jnp.float32)
    bias = jnp.asarray(rng.normal(0.0, 0.1, size=c_in), jnp.float32)
    g = jnp.asarray(rng.normal(size=(b, h, w, c_out)), dtype)
    return x, wt, (mean, mul, bias), g


def compare(fused, reference) -> str:
    """Largest differences of the output (relative to its largest value) and of the statistics."""
    (y_f, (m_f, v_f)), (y_r, (m_r, v_r)) = fused, reference
    dm, dv = (float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in ((m_f, m_r), (v_f, v_r)))
    return f"output {relative(y_f, y_r):.2g} of its largest, mean {dm:.2g}, variance {dv:.2g}"


def relative(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _variants(name, x_shape, c_out, bn, settings, x, w, stats, g, ref):
    """{setting's label: {kind: jitted fn of its inputs}} for the settings that fit and compile."""
    a = x if stats is None else bn_relu(x, stats)
    ref_dw = jax.jit(xla_wgrad)(a, g, w)
    ref_dx = jax.jit(functools.partial(xla_dgrad, bn_stats=stats))(x, g, w)
    variants = {}
    for setting in settings:
        s, s_back = fits(x_shape[-1], c_out, setting), fits(c_out, x_shape[-1], setting)  # the input gradient's
        label = describe(s) if s and s_back else None
        if label is None or label in variants:
            continue
        fns = {
            "conv": jax.jit(lambda x, w, s=s: conv3x3(x, w, **s)[0]),
            "layer": jax.jit(functools.partial(fused_layer, bn_stats=stats, **s)),
            "wgrad": jax.jit(functools.partial(conv3x3_wgrad, bn_stats=stats, **s)),
            "dgrad": jax.jit(functools.partial(fused_dgrad, bn_stats=stats, **s_back)),
        }
        try:  # a setting Triton cannot compile is named, and the others run on
            layer = compare(fns["layer"](x, w), ref)
            wgrad = relative(fns["wgrad"](x, g), ref_dw)
            dgrad = relative(fns["dgrad"](x, g, w), ref_dx)
            jax.block_until_ready(fns["conv"](x, w))
        except Exception as e:  # noqa: BLE001
            print(f"{name}, {label}: cannot run: {type(e).__name__}: {str(e)[:1500]}", flush=True)
            continue
        print(
            f"{name} {x_shape} -> {c_out}{', bn' if bn else ''}, {label}: {layer}; weight gradient {wgrad:.2g}; "
            f"input gradient {dgrad:.2g}"
        )
        variants[label] = fns
    return variants


def add_timing_flags(p: argparse.ArgumentParser, kernels: str, which: str) -> None:
    """--steps, --rounds, --kernels (default `kernels`) and --`which` (a filter of the convs or blocks by name)."""
    p.add_argument("--steps", type=int, default=10, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--kernels", default=kernels, help="settings BMxBNxBKxWARPSxSTAGES,...: pixels, output and input "
                   "channels a block, warps, stages (channel blocks are cut to the conv's channels)")  # fmt: skip
    p.add_argument(f"--{which}", default="", help=f"only the {which} whose names match this regular expression "
                   "(e.g. 'down|bottom', then 'up' in a second call, should one call's 10 minutes not do)")  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_flags(p)
    add_timing_flags(p, SETTINGS, "convs")
    args = p.parse_args(argv)
    settings = [parse_setting(item) for item in args.kernels.split(",")]
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    interpreted = jax.default_backend() != "gpu"
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; batch {args.batch}, {tuple(args.size)}, "
        f"features {args.features}, depth {args.depth}, {args.dtype}"
        + ("; the kernel interpreted: values, not speed" if interpreted else ""),
        flush=True,
    )
    rows = []
    for name, x_shape, c_out, bn in network_convs(args.batch, tuple(args.size), args.features, args.depth):
        if not re.search(args.convs, name):
            continue
        x, w, stats, g = _inputs(x_shape, c_out, dtype, rng)
        stats = stats if bn else None
        a = x if stats is None else bn_relu(x, stats)  # what XLA's weight gradient reads: the forward wrote it
        base = {
            "conv": (jax.jit(xla_conv), (x, w)),
            "layer": (jax.jit(functools.partial(xla_layer, bn_stats=stats)), (x, w)),
            "wgrad": (jax.jit(xla_wgrad), (a, g, w)),
            "dgrad": (jax.jit(functools.partial(xla_dgrad, bn_stats=stats)), (x, g, w)),
        }
        ref = base["layer"][0](x, w)
        variants = _variants(name, x_shape, c_out, bn, settings, x, w, stats, g, ref)
        inputs = {"conv": (x, w), "layer": (x, w), "wgrad": (x, g), "dgrad": (x, g, w)}
        keys = [(kind, None) for kind in KINDS] + [(kind, label) for label in variants for kind in KINDS]
        times = {key: [] for key in keys}
        for _ in range(args.rounds):
            for kind, label in keys:
                fn, fn_args = base[kind] if label is None else (variants[label][kind], inputs[kind])
                times[kind, label].append(_ms_per_call(fn, fn_args, args.steps))
        med = {key: float(np.median(t)) for key, t in times.items()}
        best = {kind: min((med[kind, label], label) for label in variants) for kind in KINDS if variants}
        rows.append(
            (name, x_shape, c_out, bn, {kind: (med[kind, None], *best.get(kind, (np.nan, "-"))) for kind in KINDS})
        )
        # now, not only in the tables at the end: a call cut short by its time limit keeps what it timed
        timed = "; ".join(
            f"{kind} {xla:.3f} against {k:.3f} ({label})" for kind, (xla, k, label) in rows[-1][-1].items()
        )
        print(f"{name} timed, XLA's ms against the kernel's: {timed}", flush=True)
    report(rows)


HEADERS = {
    "conv": "the conv alone: XLA's (cuDNN's on a GPU) against the kernel's",
    "layer": "(batch norm + ReLU ->) conv -> statistics: XLA's passes against the fused kernel",
    "wgrad": "the weight gradient: XLA's (from the activations written) against the kernel's (batch norm taken in)",
    "dgrad": "the input gradient (on through batch norm + ReLU): cuDNN's + XLA's two passes against the kernel's + one",
}


def report(rows, headers=None) -> None:
    """For each kind, one line a conv and the total: XLA's ms, the kernel's fastest setting's ms, XLA /
    kernel, and the TFLOP/s of each (benchmarks/cudnn_graphs.py: a cuDNN graph's, with its `headers`)."""
    saved, headers = {}, headers or HEADERS
    for kind in [k for k in KINDS if rows and k in rows[0][-1]]:  # the kinds timed
        print(f"\n{headers[kind]}\n{'conv':14s} {'input':22s} out  bn   XLA ms  kernel ms (setting)        "
              "XLA/kernel  TFLOP/s XLA kernel")  # fmt: skip
        total = np.zeros(2)
        for name, x_shape, c_out, bn, times in rows:
            xla, kernel, label = times[kind]
            tf = conv_flops(x_shape, c_out) / 1e9
            total += (xla, kernel)
            print(
                f"{name:14s} {str(x_shape):22s} {c_out:4d} {'y' if bn else ' '} {xla:8.3f} {kernel:8.3f} ({label:14s}) "
                f"{xla / kernel:8.2f}x {tf / xla:9.1f} {tf / kernel:6.1f}"
            )
        print(
            f"total: XLA {total[0]:.3f} ms, kernel {total[1]:.3f} ms ({total[0] / total[1]:.2f}x): "
            f"{total[0] - total[1]:+.3f} ms a step saved (negative: lost)",
            flush=True,
        )
        saved[kind] = total[0] - total[1]
    # A training step runs each conv's layer (the conv alone is part of it), weight and input gradient.
    step = sum(saved.get(kind, 0.0) for kind in ("layer", "wgrad", "dgrad"))
    print(f"\nlayer + weight gradient + input gradient: {step:+.3f} ms a step saved, of the {NEEDED_MS} ms that 40% "
          "MFU needs at the full recipe's size (docs/benchmarks.md)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
