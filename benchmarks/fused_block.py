"""A whole conv block's training, forward and backward, with benchmarks/conv_kernels.py's kernels in it,
timed against fcn's ConvBlock.

    python benchmarks/fused_block.py --batch 16 --size 360 480 --dtype bfloat16   # on a GPU
    python benchmarks/fused_block.py --batch 1 --size 8 8 --features 16 --depth 1 --rounds 1   # anywhere

benchmarks/fused_conv.py times each conv alone. What issue #6's last target asks is how much of a
training step the kernels would save (2.6 ms on an H200: docs/benchmarks.md), and that depends on
what they take out of the block around them: batch norm's statistics passes, the normalised
activations written and read back. `fused_block` computes what fcn's ConvBlock computes in
training (3x3 conv -> batch norm -> ReLU, twice; batch norm's statistics for the running averages),
as one `jax.custom_vjp`:
  - forward: y1 = conv1(x) with its statistics (by `conv3x3`'s sums with `first_kernel` where the
    channels fit, else XLA's conv and fcn.norm.batch_stats); y2 and its sums by `conv3x3` with batch
    norm 1 + ReLU applied to y1 as it loads it (the normalised y1 is never written); out =
    relu(bn2(y2)) by XLA;
  - backward: fcn.norm._bn_relu_bwd for both batch norms; both input gradients by XLA (cuDNN on a
    GPU); conv2's weight gradient by `conv3x3_wgrad` with batch norm 1 + ReLU taken in on y1, conv1's
    by `conv3x3_wgrad` with `first_kernel` where it fits, else XLA's. With `dgrad_kernel`, conv2's
    input gradient by `conv3x3_dgrad`, whose epilogue masks it by batch norm 1's ReLU and writes
    batch norm 1's gradient's two sums (fcn.norm.bn_grad_from_sums does the rest: its reductions'
    pass is gone), and conv1's by `conv3x3_dgrad` too with `first_kernel` where it fits.
The dtypes are fcn's: batch norm's scale and bias and the conv kernels in the compute dtype, the
parameters' gradients rounded to it and returned in float32.
`main` times, for each of the U-Net's 9 blocks at its padded size, the block's forward + backward
(a fixed random output gradient; gradients of the parameters and of x, but for down0's images)
by fcn's ConvBlock and by `fused_block` for each `--kernels` setting, with and without the first
conv's kernel and the input gradients', in interleaved rounds (`--steps` calls each; median of the
rounds), after comparing their values (printed). A setting that does not compile is named and left out. On a CPU the
kernels are interpreted: values, not speed. Not a test, and not used by fcn.
In bfloat16 the gradients differ by more than one rounding where a ReLU's mask flips: XLA may keep
its own conv's output unrounded where it reads it again (excess precision), the kernel's is
rounded; with XLA's `xla_allow_excess_precision` off the two agree to rounding
(tests/test_fused_block.py).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.conv_kernels import (  # noqa: E402
    conv3x3,
    conv3x3_dgrad,
    conv3x3_wgrad,
    describe,
    fits,
    parse_setting,
    stats_from_sums,
)
from benchmarks.fused_conv import add_timing_flags, bn_relu, relative, xla_conv, xla_wgrad  # noqa: E402
from benchmarks.head_loss import _ms_per_call  # noqa: E402
from fcn import canvas, layers, norm, ops  # noqa: E402
from fcn.model import ConvBlock  # noqa: E402

TARGET_MS = 2.6  # docs/benchmarks.md: a 13.9 ms step of kernels against the 11.3 ms of 40% MFU
PARAMS = ("w1", "w2", "scale1", "bias1", "scale2", "bias2")
IN_CHANNELS = 3  # fcn's default model: RGB images
# Each setting is 4 variants a block, each compiling up to 6 kernels: pass fused_conv.py's fastest.
SETTINGS = "128x64x32x4x3,128x64x64x4x3"


# -- the fused block ------------------------------------------------------------------------------


def block_params(state) -> dict:
    """A ConvBlock's parameters (`nnx.split(block, nnx.Param, ...)[1]`, or gradients of them) as
    fused_block's `params`: {w1, w2: [3, 3, C_in, C_out], scale1, bias1, scale2, bias2: [C_out]}."""
    convs, norms = state["convs"], state["norms"]
    out = {f"w{i + 1}": convs[i]["kernel"][...] for i in range(2)}
    for i in range(2):
        out[f"scale{i + 1}"], out[f"bias{i + 1}"] = norms[i]["norm"]["scale"][...], norms[i]["norm"]["bias"][...]
    return out


def block_epsilon(block: ConvBlock) -> float:
    """Batch norm's epsilon of a ConvBlock that fused_block computes (no bottleneck, two training-mode
    plain batch norms with scale and bias); a ValueError naming what differs otherwise."""
    if len(block.reduce) or len(block.convs) != 2:
        raise ValueError("fused_block: a ConvBlock with a bottleneck (model.bottleneck > 0) is not fused")
    if not all(norm.fusable_bn_relu(n) for n in block.norms):
        raise ValueError(f"fused_block: model.norm={block.norms[0].kind!r}: only training-mode batch norm is fused")
    eps = {float(n.norm.epsilon) for n in block.norms}
    if len(eps) != 1:
        raise ValueError(f"fused_block: the two batch norms' epsilons differ: {sorted(eps)}")
    return eps.pop()


def update_stats(block: ConvBlock, stats) -> None:
    """The block's running averages updated with fused_block's statistics, as fcn's batch norm does."""
    mean1, var1, mean2, var2 = stats
    norm.update_running_stats(block.norms[0].norm, mean1, var1)
    norm.update_running_stats(block.norms[1].norm, mean2, var2)


class _Config(NamedTuple):  # hashable: custom_vjp's static argument
    eps: float
    first: tuple | None  # conv1's kernel setting (items), None: XLA's conv
    second: tuple  # conv2's
    first_back: tuple | None  # conv1's input gradient's (channels the other way round), None: XLA's
    dgrad: bool  # conv2's input gradient by the kernel
    interpret: bool | None


def fused_block(
    params: dict, x_BHWC, *, eps: float, first_kernel: bool, setting: dict, dgrad_kernel: bool = False, interpret=None
):
    """(fcn's ConvBlock in training on x, in x's dtype; (mean1, var1, mean2, var2), batch norm's batch
    statistics, with no gradient through them), conv2 and its weight gradient by the Pallas kernels,
    conv1 and its weight gradient too with `first_kernel` where `setting` fits its channels; with
    `dgrad_kernel` the input gradients too (conv1's with `first_kernel`)."""
    dtype = x_BHWC.dtype
    c_in, c_out = params["w1"].shape[2:]
    second = fits(c_out, c_out, setting)
    if second is None:
        raise ValueError(f"fused_block: setting {setting} does not fit conv2's {c_out} channels")
    first = fits(c_in, c_out, setting) if first_kernel else None
    first_back = fits(c_out, c_in, setting) if first and dgrad_kernel else None
    items = (None if v is None else tuple(v.items()) for v in (first, second, first_back))
    cfg = _Config(float(eps), *items, bool(dgrad_kernel), interpret)
    # Cast as fcn casts them: nnx.Conv's kernel and batch norm's scale and bias (promote_dtype) to
    # the compute dtype; their gradients come back through the casts in float32.
    return _block(cfg, x_BHWC, *(params[k].astype(dtype) for k in PARAMS))


def _conv_stats(x, w, bn_stats, setting, interpret):
    """(conv's output, its batch mean, variance): by the kernel with `setting`, else XLA's passes."""
    if setting is None:
        y = xla_conv(x, w)
        return y, *norm.batch_stats(y)
    y, sums = conv3x3(x, w, bn_stats, **dict(setting), interpret=interpret)
    return y, *stats_from_sums(sums, y.size // y.shape[-1])


def _mul(var, scale, eps):
    return jax.lax.rsqrt(var + eps) * scale  # as fcn.norm._bn_forward's


def _block_fwd(cfg: _Config, x, w1, w2, scale1, bias1, scale2, bias2):
    f32 = jnp.float32
    y1, mean1, var1 = _conv_stats(x, w1, None, cfg.first, cfg.interpret)
    bn1 = (mean1, _mul(var1, scale1, cfg.eps), bias1.astype(f32))
    y2, mean2, var2 = _conv_stats(y1, w2, bn1, cfg.second, cfg.interpret)
    out = bn_relu(y2, (mean2, _mul(var2, scale2, cfg.eps), bias2.astype(f32)))
    stats = (mean1, var1, mean2, var2)
    return (out, stats), (x, y1, y2, w1, w2, scale1, bias1, scale2, bias2, stats)


def _input_grad(g, w, x_like):
    """The conv's input gradient by XLA (cuDNN's on a GPU)."""
    return jax.linear_transpose(lambda a: xla_conv(a, w), x_like)(g)[0]


def _block_bwd(cfg: _Config, res, cotangents):
    x, y1, y2, w1, w2, scale1, bias1, scale2, bias2, (mean1, var1, mean2, var2) = res
    dtype, f32 = x.dtype, jnp.float32
    dy2, dscale2, dbias2 = norm._bn_relu_bwd(cfg.eps, dtype, (y2, mean2, var2, scale2, bias2), cotangents[:1])
    bn1 = (mean1, _mul(var1, scale1, cfg.eps), bias1.astype(f32))
    dw2 = conv3x3_wgrad(y1, dy2, bn1, **dict(cfg.second), interpret=cfg.interpret)
    if cfg.dgrad:  # the ReLU's mask and batch norm 1's gradient's sums in the kernel's epilogue
        d1, sums = conv3x3_dgrad(dy2, w2, (y1, *bn1), **dict(cfg.second), interpret=cfg.interpret)
        inv1 = jax.lax.rsqrt(var1 + cfg.eps)
        dy1, dscale1, dbias1 = norm.bn_grad_from_sums(y1, d1, mean1, inv1, scale1, sums[0], sums[1])
        dscale1, dbias1 = dscale1.astype(scale1.dtype), dbias1.astype(bias1.dtype)  # as _bn_relu_bwd's
    else:
        da1 = _input_grad(dy2, w2, y1)
        dy1, dscale1, dbias1 = norm._bn_relu_bwd(cfg.eps, dtype, (y1, mean1, var1, scale1, bias1), (da1,))
    if cfg.first is None:
        dw1 = xla_wgrad(x, dy1, w1)
    else:
        dw1 = conv3x3_wgrad(x, dy1, None, **dict(cfg.first), interpret=cfg.interpret)
    if cfg.first_back is None:
        dx = _input_grad(dy1, w1, x)
    else:
        dx = conv3x3_dgrad(dy1, w1, **dict(cfg.first_back), interpret=cfg.interpret)[0]
    # The kernels' float32 weight gradients rounded to the kernel's dtype, as XLA's gradient of fcn's
    # conv in that dtype is.
    return dx, dw1.astype(w1.dtype), dw2.astype(w2.dtype), dscale1, dbias1, dscale2, dbias2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block(cfg, x, w1, w2, scale1, bias1, scale2, bias2):
    return _block_fwd(cfg, x, w1, w2, scale1, bias1, scale2, bias2)[0]


_block.defvjp(_block_fwd, _block_bwd)


# -- the network's blocks, and fcn's ------------------------------------------------------------------


def network_blocks(batch: int, size: tuple[int, int], features: int, depth: int) -> list[tuple]:
    """(name, input shape [B, H, W, C_in], C_out) for each ConvBlock of fcn's U-Net (upsample
    "transpose") at the padded size: down0 takes the images, each up block the upsampled and the
    skip's channels concatenated."""
    m = 2**depth
    h, w = canvas.ceil_to(size[0], m), canvas.ceil_to(size[1], m)
    widths = [features * 2**level for level in range(depth + 1)]
    blocks, c = [], IN_CHANNELS
    for level, width in enumerate(widths):
        blocks.append(("bottom" if level == depth else f"down{level}", (batch, h >> level, w >> level, c), width))
        c = width
    for level in range(depth - 1, -1, -1):
        blocks.append((f"up{level}", (batch, h >> level, w >> level, 2 * widths[level]), widths[level]))
    return blocks


def conv_block(c_in: int, c_out: int, dtype, conv_impl: str = "gemm", seed: int = 0) -> ConvBlock:
    """fcn's ConvBlock as fcn.model.UNet builds it (batch norm, no bottleneck), with batch norm's scale
    and bias drawn at random (not ones and zeros, whose gradients would tell less)."""
    extra = {"conv_general_dilated": fn} if (fn := ops.conv_fn(conv_impl)) is not None else {}

    def conv(c_in, c_out, k, *, use_bias=True, rngs):
        return layers.Conv(c_in, c_out, k, use_bias=use_bias, dtype=dtype, rngs=rngs, **extra)

    block = ConvBlock(c_in, c_out, norm="batch", bottleneck=0, dtype=dtype, conv=conv, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for n in block.norms:
        n.norm.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, c_out), jnp.float32))
        n.norm.bias.set_value(jnp.asarray(rng.normal(0.0, 0.2, c_out), jnp.float32))
    return block


def reference_grad(block: ConvBlock, wrt_x: bool):
    """A function (params state, x, g) -> (output, running statistics' state, gradients of the params
    state (and of x with `wrt_x`)): fcn's ConvBlock in training, forward and backward."""
    graphdef, _, rest = nnx.split(block, nnx.Param, ...)

    def fn(params, x, g):
        def forward(params, x):
            blk = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))  # variables of this trace
            return blk(x), nnx.state(blk, nnx.BatchStat)

        if wrt_x:
            out, vjp, new = jax.vjp(forward, params, x, has_aux=True)
            return out, new, vjp(g)
        out, vjp, new = jax.vjp(lambda p: forward(p, x), params, has_aux=True)
        return out, new, vjp(g)

    return fn


def fused_grad(wrt_x: bool, **kwargs):
    """A function (params, x, g) -> (output, statistics, gradients of the params (and of x with `wrt_x`))
    of fused_block(**kwargs)."""

    def fn(params, x, g):
        if wrt_x:
            out, vjp, stats = jax.vjp(lambda p, x: fused_block(p, x, **kwargs), params, x, has_aux=True)
            return out, stats, vjp(g)
        out, vjp, stats = jax.vjp(lambda p: fused_block(p, x, **kwargs), params, has_aux=True)
        return out, stats, vjp(g)

    return fn


# -- timing ---------------------------------------------------------------------------------------------


def _values(result, wrt_x: bool, fused: bool) -> dict:
    """{"output", "x", and each parameter: array} of a reference_grad or fused_grad result."""
    out, _, grads = result
    params = grads[0] if fused else block_params(grads[0])
    return {"output": out, **({"x": grads[1]} if wrt_x else {}), **params}


def _variants(name, shape, c_out, settings, eps, wrt_x, args_, ref) -> dict:
    """{label: jitted fused_grad} for the settings that fit and compile, with and without conv1's kernel
    and the input gradients'."""
    variants = {}
    for setting in settings:
        for first, dgrad in ((False, False), (True, False), (False, True), (True, True)):
            s = fits(c_out, c_out, setting)
            if s is None or (first and fits(shape[-1], c_out, setting) is None):
                continue  # conv2's channels do not fit; or conv1's do not, which first=False runs
            label = describe(s) + (" +conv1" if first else "") + (" +dgrad" if dgrad else "")
            if label in variants:
                continue
            fn = jax.jit(fused_grad(wrt_x, eps=eps, first_kernel=first, setting=setting, dgrad_kernel=dgrad))
            try:  # a setting Triton cannot compile is named, and the others run on
                got = _values(fn(*args_), wrt_x, fused=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name}, {label}: cannot run: {type(e).__name__}: {str(e)[:1500]}", flush=True)
                continue
            diffs = ", ".join(f"{k} {relative(got[k], ref[k]):.2g}" for k in ref)
            print(f"{name} {shape} -> {c_out}, {label}: relative to the largest: {diffs}", flush=True)
            variants[label] = fn
    return variants


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_flags(p)
    p.set_defaults(conv_impl="gemm")  # as fcn's model runs off a CPU: 3x3 convs left to XLA
    add_timing_flags(p, SETTINGS, "blocks")
    args = p.parse_args(argv)
    settings = [parse_setting(item) for item in args.kernels.split(",")]
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    print(
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; batch {args.batch}, {tuple(args.size)}, "
        f"features {args.features}, depth {args.depth}, {args.dtype}, fcn's convs {args.conv_impl}"
        + ("; the kernels interpreted: values, not speed" if jax.default_backend() != "gpu" else ""),
        flush=True,
    )
    rows = []
    for i, (name, shape, c_out) in enumerate(network_blocks(args.batch, tuple(args.size), args.features, args.depth)):
        if not re.search(args.blocks, name):
            continue
        block = conv_block(shape[-1], c_out, dtype, args.conv_impl, seed=i)
        eps = block_epsilon(block)
        wrt_x = name != "down0"  # the images need no gradient
        x = jnp.asarray(rng.normal(0.0, 1.0, size=shape), dtype)
        g = jnp.asarray(rng.normal(size=(*shape[:-1], c_out)), dtype)
        state = nnx.split(block, nnx.Param, ...)[1]
        base = jax.jit(reference_grad(block, wrt_x))
        ref = _values(base(state, x, g), wrt_x, fused=False)
        variants = _variants(name, shape, c_out, settings, eps, wrt_x, (block_params(state), x, g), ref)
        keys = [None, *variants]
        times = {key: [] for key in keys}
        for _ in range(args.rounds):
            for key in keys:
                fn, fn_args = (base, (state, x, g)) if key is None else (variants[key], (block_params(state), x, g))
                times[key].append(_ms_per_call(fn, fn_args, args.steps))
        med = {key: float(np.median(t)) for key, t in times.items()}
        best = min((med[key], key) for key in variants) if variants else (np.nan, "-")
        rows.append((name, shape, c_out, med[None], *best))
        # now, not only in the table at the end: a call cut short by its time limit keeps what it timed
        print(f"{name} timed: XLA {med[None]:.3f} ms, fused {best[0]:.3f} ms ({best[1]})", flush=True)
    report(rows)


def report(rows) -> None:
    """One line a block (fcn's ms, the fastest fused variant's ms and setting, ms saved) and the total."""
    print(f"\nforward + backward of each block: fcn's ConvBlock (XLA) against fused_block's fastest setting\n"
          f"{'block':8s} {'input':22s}  out    XLA ms  fused ms (setting)                 saved ms")  # fmt: skip
    total = np.zeros(2)
    for name, shape, c_out, xla, fused, label in rows:
        if not np.isnan(fused):
            total += (xla, fused)
        print(f"{name:8s} {str(shape):22s} {c_out:4d} {xla:9.3f} {fused:9.3f} ({label:27s}) {xla - fused:+9.3f}")
    print(
        f"total: XLA {total[0]:.3f} ms, fused {total[1]:.3f} ms: {total[0] - total[1]:+.3f} ms a step saved "
        f"(negative: lost), against the {TARGET_MS} ms that 40% MFU needs (blocks with no fused variant left out)",
        flush=True,
    )


if __name__ == "__main__":
    main()
