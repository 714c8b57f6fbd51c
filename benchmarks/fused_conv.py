"""Can a Pallas 3x3 convolution take batch norm in, and keep up with cuDNN? A prototype, timed.

    python benchmarks/fused_conv.py --batch 16 --size 360 480 --dtype bfloat16   # on a GPU
    python benchmarks/fused_conv.py --batch 1 --size 16 16 --features 16 --depth 1 --rounds 1   # anywhere

Issue #6's last target, 40% model FLOPs utilisation on an H200, needs the training step 2.6 ms
shorter (docs/benchmarks.md). cuDNN's convolutions already run at about 61% of the bfloat16
product's rate; the rest of the step is passes over the activations around them: batch norm's
statistics of each conv's output, and its normalisation + ReLU, which XLA cannot fuse into a
cuDNN call. This file times the first piece of the way to fewer passes, before any of it goes
into fcn: one Pallas (Triton) kernel per 3x3 convolution, an implicit matrix product over the
nine taps, that
  - with `norm`, applies batch norm + ReLU to its input as it loads it (the input is the
    previous conv's raw output; the normalised activations are never written), and
  - writes, beside its output, each block's per-channel sum and sum of squares: batch norm's
    statistics without another pass.
For every 3x3 conv of the network at its padded size, side by side in one process, in
interleaved rounds (`--steps` calls each; median of the rounds), forward only:
  - "conv": XLA's convolution alone (cuDNN on a GPU) against the kernel with neither extra;
  - "layer": XLA's (batch norm + ReLU ->) conv -> statistics, as fcn's training step computes
    them, against the kernel with both.
Values are compared first (printed). A `--kernels` setting that does not compile is named and
left out; each conv's fastest setting counts in the totals. On a CPU the kernel is interpreted:
values, not speed. Not a test, and not used by fcn: the backward pass (the input gradient is the
same kernel with the weights flipped; the weight gradient is not written) would be next.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.head_loss import _ms_per_call  # noqa: E402
from fcn import canvas, norm  # noqa: E402

EPS = 1e-5
SETTINGS = "64x64x32x4x3,128x64x32x4x3,128x128x32x8x3,64x128x64x4x3"


def _kernel(x_ref, w_ref, mean_ref, mul_ref, bias_ref, y_ref, s_ref, *, h, w, bm, bn, bk, prologue):
    """Output pixels [i*bm, (i+1)*bm) of the flattened [B*H*W] grid, channels [j*bn, (j+1)*bn):
    the sum over 9 taps x (C_in / bk) chunks of (shifted input chunk [bm, bk]) . (weights [bk, bn]),
    the input zero outside the image (after batch norm + ReLU with `prologue`, as the conv's
    padding is of the activations); then the block's per-channel sum and sum of squares."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    f32 = jnp.float32
    num_pixels, c_in = x_ref.shape
    i, j = pl.program_id(0), pl.program_id(1)
    p = i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
    div, rem = jax.lax.div, jax.lax.rem  # jnp's // and % (floored) have no Triton lowering; all are >= 0 here
    col, row = rem(p, w), rem(div(p, w), h)
    inside = p < num_pixels
    chunks = c_in // bk

    def tap(t, acc):
        k0 = pl.multiple_of(rem(t, chunks) * bk, bk)
        dy, dx = div(div(t, chunks), 3) - 1, rem(div(t, chunks), 3) - 1
        valid = inside & (row + dy >= 0) & (row + dy < h) & (col + dx >= 0) & (col + dx < w)
        src = jnp.clip(p + dy * w + dx, 0, num_pixels - 1)
        ks = pl.ds(k0, bk)
        # Integer-array indices on both axes: Pallas's interpreter takes no mix of arrays and slices.
        a = plgpu.load(
            x_ref.at[src[:, None], k0 + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)],
            mask=valid[:, None],
            other=0,
        )
        if prologue:  # as fcn.norm._bn_forward: (x - mean) * (rsqrt(var + eps) * scale) + bias
            pre = (a.astype(f32) - mean_ref[ks][None, :]) * mul_ref[ks][None, :] + bias_ref[ks][None, :]
            a = jnp.where(valid[:, None], jnp.maximum(pre, 0.0), 0.0).astype(x_ref.dtype)
        return acc + jnp.dot(a, w_ref[div(t, chunks), ks, pl.ds(j * bn, bn)], preferred_element_type=f32)

    y = jax.lax.fori_loop(0, 9 * chunks, tap, jnp.zeros((bm, bn), f32)).astype(y_ref.dtype)
    cols = j * bn + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    plgpu.store(y_ref.at[p[:, None], cols], y, mask=inside[:, None])  # rows past the end: dropped
    y32 = jnp.where(inside[:, None], y.astype(f32), 0.0)  # the statistics of the rounded output
    s_ref[i, 0, pl.ds(j * bn, bn)] = jnp.sum(y32, axis=0)
    s_ref[i, 1, pl.ds(j * bn, bn)] = jnp.sum(y32 * y32, axis=0)


def fits(c_in: int, c_out: int, setting: dict) -> dict | None:
    """`setting` with its channel blocks cut to the conv's channels, or None where Triton cannot
    take them (power-of-two blocks of 16 channels or more, dividing the channels)."""
    bn, bk = min(setting["bn"], c_out), min(setting["bk"], c_in)
    if any(b < 16 or b & (b - 1) or c % b for b, c in ((bn, c_out), (bk, c_in))):
        return None
    return dict(setting, bn=bn, bk=bk)


def conv3x3(x_BHWC, w_33IO, bn_stats=None, *, bm=64, bn=64, bk=32, num_warps=4, num_stages=3, interpret=None):
    """(3x3 'SAME' conv of x, or with `bn_stats` = (mean, mul, bias) of relu((x - mean) * mul + bias);
    [2, C_out] float32 per-channel sum and sum of squares of the output) in one kernel."""
    from jax.experimental import pallas as pl

    b, h, w, c_in = x_BHWC.shape
    c_out = w_33IO.shape[-1]
    setting = fits(c_in, c_out, dict(bn=bn, bk=bk))
    if setting is None:
        raise ValueError(f"conv3x3: channels {c_in} -> {c_out} do not divide into blocks of {bk} -> {bn}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    prologue = bn_stats is not None
    ones = jnp.ones((c_in,), jnp.float32)
    mean, mul, bias = bn_stats if prologue else (ones, ones, ones)
    num_pixels, blocks = b * h * w, pl.cdiv(b * h * w, bm)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    y, sums = pl.pallas_call(
        functools.partial(_kernel, h=h, w=w, bm=bm, prologue=prologue, **setting),
        grid=(blocks, c_out // setting["bn"]),
        out_shape=[
            jax.ShapeDtypeStruct((num_pixels, c_out), x_BHWC.dtype),
            jax.ShapeDtypeStruct((blocks, 2, c_out), jnp.float32),
        ],
        interpret=interpret,
        name="fcn_conv3x3_bn",
        **params,
    )(
        x_BHWC.reshape(num_pixels, c_in),
        w_33IO.astype(x_BHWC.dtype).reshape(9, c_in, c_out),
        *(v.astype(jnp.float32) for v in (mean, mul, bias)),
    )
    return y.reshape(b, h, w, c_out), sums.sum(0)


def stats_from_sums(sums_2C, count: int):
    """Batch mean and variance from the kernel's sums, as fcn.norm.batch_stats computes them."""
    mean_C = sums_2C[0] / count
    return mean_C, jnp.maximum(0.0, sums_2C[1] / count - jax.lax.square(mean_C))


def xla_conv(x_BHWC, w_33IO):
    """The conv as fcn's model runs it off a CPU (XLA's own; cuDNN on a GPU)."""
    return jax.lax.conv_general_dilated(
        x_BHWC, w_33IO.astype(x_BHWC.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def xla_layer(x_BHWC, w_33IO, bn_stats=None):
    """(batch norm + ReLU ->) conv -> the output's batch statistics, as XLA computes them in fcn."""
    if bn_stats is not None:
        mean, mul, bias = bn_stats
        x_BHWC = jax.nn.relu((x_BHWC - mean) * mul + bias).astype(x_BHWC.dtype)
    y = xla_conv(x_BHWC, w_33IO)
    return y, norm.batch_stats(y)


def fused_layer(x_BHWC, w_33IO, bn_stats=None, **setting):
    y, sums = conv3x3(x_BHWC, w_33IO, bn_stats, **setting)
    return y, stats_from_sums(sums, y.size // y.shape[-1])


def network_convs(batch: int, size: tuple[int, int], features: int, depth: int) -> list[tuple]:
    """(name, input shape [B, H, W, C_in], C_out, batch norm + ReLU before) for each 3x3 conv of
    fcn's U-Net (upsample="transpose", no bottleneck) whose input has 16 channels or more, at
    the padded size. "bn" marks the second conv of a block: its input is the first's raw output
    through batch norm + ReLU, which nothing else reads. Every other input is read elsewhere too
    (pooled, concatenated or kept for the skip) and stays written."""
    m = 2**depth
    h, w = canvas.ceil_to(size[0], m), canvas.ceil_to(size[1], m)
    widths = [features * 2**level for level in range(depth + 1)]
    convs = []
    for level, c in enumerate(widths):
        where = "bottom" if level == depth else f"down{level}"
        shape = (batch, h >> level, w >> level)
        if level:
            convs.append((f"{where} conv1", (*shape, widths[level - 1]), c, False))
        convs.append((f"{where} conv2", (*shape, c), c, True))
    for level in range(depth - 1, -1, -1):
        c, shape = widths[level], (batch, h >> level, w >> level)
        convs += [(f"up{level} conv1", (*shape, 2 * c), c, False), (f"up{level} conv2", (*shape, c), c, True)]
    return [conv for conv in convs if conv[1][-1] >= 16]


def parse_setting(item: str) -> dict:
    """'BMxBNxBKxWARPSxSTAGES' -> conv3x3's keyword arguments."""
    bm, bn, bk, warps, stages = map(int, item.split("x"))
    return dict(bm=bm, bn=bn, bk=bk, num_warps=warps, num_stages=stages)


def conv_flops(x_shape, c_out: int) -> float:
    b, h, w, c_in = x_shape
    return 2.0 * b * h * w * 9 * c_in * c_out


def _inputs(x_shape, c_out, dtype, rng):
    """x (standing for the previous conv's raw output), weights, and batch norm's (mean, mul, bias)."""
    c_in = x_shape[-1]
    x = jnp.asarray(rng.normal(0.3, 1.5, size=x_shape), dtype)
    w = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) * (9 * c_in) ** -0.5, jnp.float32)
    mean = jnp.asarray(rng.normal(0.3, 0.1, size=c_in), jnp.float32)
    mul = jnp.asarray(rng.uniform(0.5, 1.0, size=c_in), jnp.float32)
    bias = jnp.asarray(rng.normal(0.0, 0.1, size=c_in), jnp.float32)
    return x, w, (mean, mul, bias)


def compare(fused, reference) -> str:
    """Largest differences of the output (relative to its largest value) and of the statistics."""
    (y_f, (m_f, v_f)), (y_r, (m_r, v_r)) = fused, reference
    y_f, y_r = np.asarray(y_f, np.float32), np.asarray(y_r, np.float32)
    dy = np.max(np.abs(y_f - y_r)) / max(np.max(np.abs(y_r)), 1e-30)
    dm, dv = (float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in ((m_f, m_r), (v_f, v_r)))
    return f"output {dy:.2g} of its largest, mean {dm:.2g}, variance {dv:.2g}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_flags(p)
    p.add_argument("--steps", type=int, default=10, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--kernels", default=SETTINGS, help="settings BMxBNxBKxWARPSxSTAGES,...: pixels, output and input "
                   "channels a block, warps, stages (channel blocks are cut to the conv's channels)")  # fmt: skip
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
        x, w, stats = _inputs(x_shape, c_out, dtype, rng)
        stats = stats if bn else None
        base = {"conv": jax.jit(xla_conv), "layer": jax.jit(functools.partial(xla_layer, bn_stats=stats))}
        ref = base["layer"](x, w)
        variants = {}
        for setting in settings:
            s = fits(x_shape[-1], c_out, setting)
            if s is None or s in [v[2] for v in variants.values()]:
                continue
            label = "x".join(str(s[k]) for k in ("bm", "bn", "bk", "num_warps", "num_stages"))
            layer = jax.jit(functools.partial(fused_layer, bn_stats=stats, **s))
            conv = jax.jit(lambda x, w, s=s: conv3x3(x, w, **s)[0])
            try:  # a setting Triton cannot compile is named, and the others run on
                print(f"{name} {x_shape} -> {c_out}{', bn' if bn else ''}, {label}: {compare(layer(x, w), ref)}")
                jax.block_until_ready(conv(x, w))
            except Exception as e:  # noqa: BLE001
                print(f"{name}, {label}: cannot run: {type(e).__name__}: {str(e)[:1500]}", flush=True)
                continue
            variants[label] = (conv, layer, s)
        times = {
            key: [] for key in ["conv", "layer"] + [f"{k} {label}" for label in variants for k in ("conv", "layer")]
        }
        for _ in range(args.rounds):
            for key in times:
                kind, _, label = key.partition(" ")
                fn = base[kind] if not label else variants[label][kind == "layer"]
                times[key].append(_ms_per_call(fn, (x, w), args.steps))
        med = {key: float(np.median(t)) for key, t in times.items()}
        best = {kind: min((med[f"{kind} {label}"], label) for label in variants) for kind in ("conv", "layer")}
        rows.append((name, x_shape, c_out, bn, med["conv"], med["layer"], best["conv"], best["layer"]))
    report(rows)


def report(rows) -> None:
    """One line a conv, and the totals: XLA's conv and the kernel's (ms, TFLOP/s), XLA's layer and
    the fused one (ms), and XLA / kernel."""
    print(f"\n{'conv':14s} {'input':22s} out  bn | conv: XLA ms  kernel ms (setting)    TFLOP/s XLA kernel | "
          "layer: XLA ms  fused ms (setting)  XLA/fused")  # fmt: skip
    total = np.zeros(4)
    for name, x_shape, c_out, bn, conv_x, layer_x, (conv_k, conv_s), (layer_k, layer_s) in rows:
        tf = conv_flops(x_shape, c_out) / 1e9
        total += (conv_x, conv_k, layer_x, layer_k)
        print(
            f"{name:14s} {str(x_shape):22s} {c_out:4d} {'y' if bn else ' '}  | {conv_x:8.3f} {conv_k:8.3f} "
            f"({conv_s:14s}) {tf / conv_x:6.1f} {tf / conv_k:6.1f} | {layer_x:8.3f} {layer_k:8.3f} ({layer_s:14s}) "
            f"{layer_x / layer_k:5.2f}x"
        )
    print(
        f"total: conv XLA {total[0]:.3f} ms, kernel {total[1]:.3f} ms ({total[0] / total[1]:.2f}x); layer XLA "
        f"{total[2]:.3f} ms, fused {total[3]:.3f} ms ({total[2] / total[3]:.2f}x): {total[2] - total[3]:+.3f} ms "
        "saved a forward pass (negative: lost)",
        flush=True,
    )


if __name__ == "__main__":
    main()
