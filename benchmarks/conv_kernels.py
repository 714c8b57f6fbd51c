"""Prototype Pallas (Triton) kernels for the U-Net's 3x3 convolutions with batch norm taken in:
benchmarks/fused_conv.py times them against cuDNN and XLA. Not used by fcn.

The kernels are implicit matrix products over the nine taps of a 3x3 'SAME' convolution, NHWC,
on the pixels flattened to [B*H*W] rows: a block of `bm` pixels reads, for each tap and each
chunk of `bk` input channels, the pixels that tap shifts it to, zero outside the image. With
batch norm's (mean, mul, bias), that input is the previous conv's raw output, and the kernel
applies batch norm + ReLU to it as it loads it (`_tap_input`), so the normalised activations are
never written.
  - `conv3x3`: the conv's output, and each block's per-channel sum and sum of squares of it
    (batch norm's statistics without a pass of their own).
  - `conv3x3_wgrad`: the weight gradient, sum over pixels of input (tap-shifted) x output
    gradient, each instance over its share of the pixels; XLA adds the shares.
  - `conv3x3_dgrad`: the input gradient, `conv3x3`'s kernel over the output gradient with the
    taps flipped and each tap's weights transposed. Where the conv's input was batch norm + ReLU of
    y, its epilogue zeroes the gradient where the ReLU did and writes the two per-channel sums of
    batch norm's gradient (of it, and of it times y) beside it: their pass over the activations gone.
Triton's blocks are powers of two and its products take 16 rows and columns at least: the
channels must divide into blocks of 16 or more (`fits`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fcn import canvas

# The weight gradient's product has `bk` rows: Hopper's wgmma takes it from 64 (else Triton uses mma.sync).
SETTINGS = "64x64x32x4x3,128x64x32x4x3,128x128x32x8x3,64x128x64x4x3,128x64x64x4x3"
_KEYS = ("bm", "bn", "bk", "num_warps", "num_stages")


def parse_setting(item: str) -> dict:
    """'BMxBNxBKxWARPSxSTAGES' -> the kernels' keyword arguments: pixels, output and input channels a
    block, warps, pipelining stages."""
    return dict(zip(_KEYS, map(int, item.split("x"))))


def describe(setting: dict) -> str:
    return "x".join(str(setting[k]) for k in _KEYS)


def fits(c_in: int, c_out: int, setting: dict) -> dict | None:
    """`setting` with its channel blocks cut to the conv's channels, or None where Triton cannot
    take them (power-of-two blocks of 16 channels or more, dividing the channels)."""
    bn, bk = min(setting["bn"], c_out), min(setting["bk"], c_in)
    if any(b < 16 or b & (b - 1) or c % b for b, c in ((bn, c_out), (bk, c_in))):
        return None
    return dict(setting, bn=bn, bk=bk)


def _tap_input(refs, p, t, *, h, w, bk, prologue):
    """The input of tap t // chunks, channels chunk t % chunks, for output pixels p [bm]: [bm, bk] in
    the input's dtype, zero outside the image (after batch norm + ReLU with `prologue`: the conv pads
    its activations); and the tap's index."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    x_ref, mean_ref, mul_ref, bias_ref = refs
    num_pixels, c_in = x_ref.shape
    div, rem = jax.lax.div, jax.lax.rem  # jnp's // and % (floored) have no Triton lowering; all are >= 0 here
    chunks = c_in // bk
    tap, k0 = div(t, chunks), pl.multiple_of(rem(t, chunks) * bk, bk)
    dy, dx = div(tap, 3) - 1, rem(tap, 3) - 1
    col, row = rem(p, w), rem(div(p, w), h)
    valid = (p < num_pixels) & (row + dy >= 0) & (row + dy < h) & (col + dx >= 0) & (col + dx < w)
    src = jnp.clip(p + dy * w + dx, 0, num_pixels - 1)
    # Integer-array indices on both axes: Pallas's interpreter takes no mix of arrays and slices.
    a = plgpu.load(x_ref.at[src[:, None], k0 + _iota(bk)], mask=valid[:, None], other=0)
    if prologue:  # as fcn.norm._bn_forward: (x - mean) * (rsqrt(var + eps) * scale) + bias
        ks = pl.ds(k0, bk)
        pre = (a.astype(jnp.float32) - mean_ref[ks][None, :]) * mul_ref[ks][None, :] + bias_ref[ks][None, :]
        a = jnp.where(valid[:, None], jnp.maximum(pre, 0.0), 0.0).astype(x_ref.dtype)
    return a, tap, k0


def _iota(n: int):
    return jax.lax.broadcasted_iota(jnp.int32, (1, n), 1)


def _kernel(
    x_ref,
    w_ref,
    mean_ref,
    mul_ref,
    bias_ref,
    z_ref,
    zmean_ref,
    zmul_ref,
    zbias_ref,
    y_ref,
    s_ref,
    *,
    h,
    w,
    bm,
    bn,
    bk,
    prologue,
    masked,
):
    """Output pixels [i*bm, (i+1)*bm), channels [j*bn, (j+1)*bn): the sum over 9 taps x (C_in / bk)
    chunks of (input [bm, bk]) . (weights [bk, bn]) = o; then the block's per-channel sums of o and of
    o * z. z is o itself (batch norm's sum of squares), or when `masked` the z_ref read alongside,
    where o is zeroed as ReLU(z's batch norm) is (batch norm's gradient's sums)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    f32 = jnp.float32
    i, j = pl.program_id(0), pl.program_id(1)
    p = i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
    cols = pl.ds(j * bn, bn)

    def tap(t, acc):
        a, k, k0 = _tap_input((x_ref, mean_ref, mul_ref, bias_ref), p, t, h=h, w=w, bk=bk, prologue=prologue)
        return acc + jnp.dot(a, w_ref[k, pl.ds(k0, bk), cols], preferred_element_type=f32)

    y = jax.lax.fori_loop(0, 9 * (x_ref.shape[1] // bk), tap, jnp.zeros((bm, bn), f32)).astype(y_ref.dtype)
    inside = p < x_ref.shape[0]
    where = (p[:, None], j * bn + _iota(bn))
    if masked:  # as fcn.norm._bn_relu_bwd: d = dy where (z - mean) * mul + bias > 0, then sums of d and d * z
        z = plgpu.load(z_ref.at[where], mask=inside[:, None], other=0).astype(f32)
        keep = (z - zmean_ref[cols][None, :]) * zmul_ref[cols][None, :] + zbias_ref[cols][None, :] > 0
        y = jnp.where(keep, y, jnp.zeros_like(y))
    plgpu.store(y_ref.at[where], y, mask=inside[:, None])  # rows past the end: dropped
    y32 = jnp.where(inside[:, None], y.astype(f32), 0.0)  # the sums of the rounded output
    s_ref[i, 0, cols] = jnp.sum(y32, axis=0)
    s_ref[i, 1, cols] = jnp.sum(y32 * (z if masked else y32), axis=0)


def _wgrad_kernel(x_ref, g_ref, mean_ref, mul_ref, bias_ref, dw_ref, *, h, w, bm, bn, bk, steps, prologue):
    """Weight gradient of tap x input chunk t (grid axis 0), output channels j (axis 1), over pixels
    [s*steps*bm, (s+1)*steps*bm) (axis 2): sum of (input [bm, bk])^T . (output gradient [bm, bn])."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    t, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_pixels = x_ref.shape[0]
    tn = (((0,), (0,)), ((), ()))  # [P, bk] . [P, bn] over P

    def step(i, acc):
        p = (s * steps + i) * bm + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
        a, _, _ = _tap_input((x_ref, mean_ref, mul_ref, bias_ref), p, t, h=h, w=w, bk=bk, prologue=prologue)
        g = plgpu.load(g_ref.at[p[:, None], j * bn + _iota(bn)], mask=(p < num_pixels)[:, None], other=0)
        return acc + jax.lax.dot_general(a, g.astype(a.dtype), tn, preferred_element_type=jnp.float32)

    chunks = x_ref.shape[1] // bk
    k0 = pl.multiple_of(jax.lax.rem(t, chunks) * bk, bk)
    dw = jax.lax.fori_loop(0, steps, step, jnp.zeros((bk, bn), jnp.float32))
    dw_ref[s, jax.lax.div(t, chunks), pl.ds(k0, bk), pl.ds(j * bn, bn)] = dw


def _params(interpret, num_warps, num_stages) -> dict:
    if interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu

    return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def _norm_args(bn_stats, c_in: int):
    """(mean, mul, bias) in float32, ones where there is no batch norm (unread)."""
    ones = jnp.ones((c_in,), jnp.float32)
    return tuple(v.astype(jnp.float32) for v in (bn_stats if bn_stats is not None else (ones, ones, ones)))


def _setting(c_in: int, c_out: int, bn: int, bk: int) -> dict:
    setting = fits(c_in, c_out, dict(bn=bn, bk=bk))
    if setting is None:
        raise ValueError(f"conv3x3: channels {c_in} -> {c_out} do not divide into blocks of {bk} -> {bn}")
    return setting


def conv3x3(x_BHWC, w_33IO, bn_stats=None, *, bm=64, bn=64, bk=32, num_warps=4, num_stages=3, interpret=None):
    """(3x3 'SAME' conv of x, or with `bn_stats` = (mean, mul, bias) of relu((x - mean) * mul + bias);
    [2, C_out] float32 per-channel sum and sum of squares of the output) in one kernel."""
    return _conv(x_BHWC, w_33IO, bn_stats, None, dict(bm=bm, bn=bn, bk=bk), num_warps, num_stages, interpret)


def conv3x3_dgrad(g_BHWK, w_33IO, bn_grad=None, *, bm=64, bn=64, bk=32, num_warps=4, num_stages=3, interpret=None):
    """The input gradient of the 3x3 'SAME' conv with weights w for the output gradient g: the same
    kernel as `conv3x3`, over g with the taps flipped and each tap's weights transposed.

    With `bn_grad` = (y, mean, mul, bias), the conv's input having been relu((y - mean) * mul + bias):
    (d, the gradient zeroed where that ReLU was, and [2, C_in] float32 sums over pixels of d and of
    d * y), what fcn.norm.bn_grad_from_sums takes for batch norm's gradient, whose reductions then
    need no pass of their own. Without: (the gradient, its sums and sums of squares)."""
    w_33KI = jnp.flip(w_33IO, (0, 1)).swapaxes(2, 3)
    return _conv(g_BHWK, w_33KI, None, bn_grad, dict(bm=bm, bn=bn, bk=bk), num_warps, num_stages, interpret)


def _conv(x_BHWC, w_33IO, bn_stats, bn_grad, blocks, num_warps, num_stages, interpret):
    from jax.experimental import pallas as pl

    b, h, w, c_in = x_BHWC.shape
    c_out = w_33IO.shape[-1]
    setting = _setting(c_in, c_out, blocks["bn"], blocks["bk"])
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    num_pixels, bm = b * h * w, blocks["bm"]
    grid_m = pl.cdiv(num_pixels, bm)
    if bn_grad is None:  # unread
        z, z_stats = x_BHWC.reshape(num_pixels, c_in)[:1, :1], _norm_args(None, c_out)
    else:
        z, z_stats = bn_grad[0].reshape(num_pixels, c_out), _norm_args(bn_grad[1:], c_out)
    kernel = functools.partial(_kernel, h=h, w=w, prologue=bn_stats is not None, masked=bn_grad is not None)
    y, sums = pl.pallas_call(
        functools.partial(kernel, bm=bm, bn=setting["bn"], bk=setting["bk"]),
        grid=(grid_m, c_out // setting["bn"]),
        out_shape=[
            jax.ShapeDtypeStruct((num_pixels, c_out), x_BHWC.dtype),
            jax.ShapeDtypeStruct((grid_m, 2, c_out), jnp.float32),
        ],
        interpret=interpret,
        name="fcn_conv3x3_bn" if bn_grad is None else "fcn_conv3x3_dgrad_bn",
        **_params(interpret, num_warps, num_stages),
    )(
        x_BHWC.reshape(num_pixels, c_in),
        w_33IO.astype(x_BHWC.dtype).reshape(9, c_in, c_out),
        *_norm_args(bn_stats, c_in),
        z,
        *z_stats,
    )
    return y.reshape(b, h, w, c_out), sums.sum(0)


def wgrad_shares(num_pixels: int, bm: int, instances: int, least: int = 1024) -> tuple[int, int]:
    """(shares of the pixels, steps of `bm` pixels a share): enough shares that the grid has `least`
    instances or more (an H200 has 132 multiprocessors), no more than there are blocks of pixels."""
    blocks = -(-num_pixels // bm)
    shares = max(1, min(blocks, -(-least // instances)))
    steps = -(-blocks // shares)
    return -(-blocks // steps), steps


def conv3x3_wgrad(x_BHWC, g_BHWK, bn_stats=None, *, bm=64, bn=64, bk=32, num_warps=4, num_stages=3, interpret=None):
    """The weight gradient [3, 3, C_in, C_out] (float32) of the 3x3 'SAME' conv of x (or with `bn_stats`,
    of relu((x - mean) * mul + bias)) for the output gradient g, in one kernel and XLA's sum of its shares."""
    from jax.experimental import pallas as pl

    b, h, w, c_in = x_BHWC.shape
    c_out = g_BHWK.shape[-1]
    setting = _setting(c_in, c_out, bn, bk)
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    num_pixels = b * h * w
    grid_tk = (9 * c_in // setting["bk"], c_out // setting["bn"])
    shares, steps = wgrad_shares(num_pixels, bm, grid_tk[0] * grid_tk[1])
    dw = pl.pallas_call(
        functools.partial(_wgrad_kernel, h=h, w=w, bm=bm, steps=steps, prologue=bn_stats is not None, **setting),
        grid=(*grid_tk, shares),
        out_shape=jax.ShapeDtypeStruct((shares, 9, c_in, c_out), jnp.float32),
        interpret=interpret,
        name="fcn_conv3x3_wgrad",
        **_params(interpret, num_warps, num_stages),
    )(x_BHWC.reshape(num_pixels, c_in), g_BHWK.reshape(num_pixels, c_out), *_norm_args(bn_stats, c_in))
    return dw.sum(0).reshape(3, 3, c_in, c_out)


def stats_from_sums(sums_2C, count: int):
    """Batch mean and variance from the kernel's sums, as fcn.norm.batch_stats computes them."""
    mean_C = sums_2C[0] / count
    return mean_C, jnp.maximum(0.0, sums_2C[1] / count - jax.lax.square(mean_C))


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


def conv_flops(x_shape, c_out: int) -> float:
    """A 3x3 conv's multiply-adds x 2 (its weight gradient's are as many)."""
    b, h, w, c_in = x_shape
    return 2.0 * b * h * w * 9 * c_in * c_out
