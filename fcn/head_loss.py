"""The network's end in one GPU kernel: (batch norm + ReLU,) head, cross-entropy, its gradient, accuracy.

For XLA a training step's end (the 1x1 head, features C -> classes K; the softmax cross-entropy;
the argmax that counts the accuracy) is four kernels over the full-resolution features and
logits, whose 11-class rows of 22 bytes are read at a fraction of the memory's rate. Here one
Pallas kernel reads each block of pixels' features and labels once and writes the features'
gradient once; each block writes its share of the head's weight and bias gradients, which XLA
adds up. Mode "head+norm" takes the last decoder block's batch norm and ReLU in too, and returns
the two per-channel sums its gradient needs (`fcn.norm.bn_grad_from_sums` finishes it). Gradients
are computed in the forward pass, scaled by the cotangent in the backward pass. Values equal the
unfused end's to float rounding (tests/test_head_loss.py, on a CPU), on an H200 to bfloat16's.

`config.loss.fused_head`: "auto" (the default) is "head+norm" on the GPUs it was measured on
(NVIDIA's Hopper, compute capability 9.x), else unfused. On an H200 either mode made the CamVid
recipe's training step 2% faster (1.22x torch.compile, from 1.19x; docs/benchmarks.md, `bash
benchmarks/run_gpu.sh --head_loss`). It is written for Pallas's Triton backend, which jax 0.11
deprecates for Mosaic GPU: where a jax cannot import it, "auto" trains unfused, "head"/"head+norm" are refused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fcn import losses

FUSED_HEAD = ("off", "auto", "head", "head+norm")
# The custom call a Pallas Triton kernel lowers to, which jax.export refuses unless told (fcn.traced).
TRITON_CALL = "__gpu$xla.gpu.triton"
_NEG = -1e30  # the bias of padded classes: exp() of their shifted logits is 0
# Feature values a kernel instance takes a step (128 pixels at 32 channels), its warps, the steps it
# loops over (each instance writes one share of the head's weight gradient for all of them), and
# Triton's pipelining stages for that loop. For sm_90a the default uses 167 registers a thread
# ("head+norm": 227) and spills none (benchmarks/triton_registers.py). On an H200 it is within 3% of
# the fastest of the six settings benchmarks/head_loss.py sweeps, in both modes; 8 warps ran
# 1.2-1.7x slower (docs/benchmarks.md, the twenty-sixth and thirty-second sessions).
BLOCK_VALUES, NUM_WARPS, STEPS, NUM_STAGES = 4096, 4, 8, 2


def block_pixels(num_pixels: int, channels: int, largest: int | None = None) -> int | None:
    """Pixels a kernel instance takes a step (at most `largest`, by default BLOCK_VALUES /
    channels), or None when the kernel cannot take this shape.

    Triton's blocks have power-of-two sides, and its products need 16 rows and columns at
    least: the channels must be a power of two from 16 up. The pixel count (B x H x W at the
    network's padded size, a multiple of 4**depth) must divide into blocks.
    """
    if channels < 16 or channels != 1 << max(0, channels - 1).bit_length():
        return None
    largest = largest or max(16, BLOCK_VALUES // channels)
    for block in (1024, 512, 256, 128, 64, 32, 16):
        if block <= largest and num_pixels % block == 0:
            return block
    return None


def program_pixels(num_pixels: int, sub: int, steps: int = STEPS) -> int:
    """Pixels a kernel instance takes: `sub` times the most steps, up to `steps`, that divide `num_pixels`."""
    while steps > 1 and num_pixels % (sub * steps):
        steps //= 2
    return sub * max(steps, 1)


def fits(shape_BHWC: tuple[int, ...], largest: int | None = None) -> int | None:
    """`block_pixels` for features of this shape, split by batch over every device (as training's
    batches are, fcn.sharding), or None when they do not split evenly or do not suit the kernel."""
    b, hp, wp, c = shape_BHWC
    devices = jax.device_count()
    return block_pixels(b // devices * hp * wp, c, largest) if b % devices == 0 else None


def measured_on(device) -> bool:
    """Whether `device` is of the kind the kernel was measured to speed up: an NVIDIA GPU of
    compute capability 9.x (Hopper: an H200, docs/benchmarks.md, the thirty-second session)."""
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).split(".")[0] == "9"


@functools.cache
def triton_missing() -> str | None:
    """None where jax's Pallas Triton backend, which the kernel is written for, imports; else what failed."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError as e:
        return f"jax.experimental.pallas.triton, which this jax {jax.__version__} cannot import ({e})"
    return None


def fused_head_mode(config, device=None) -> str | None:
    """The config's choice for training on `device` (default: jax's first): None (unfused), "head" or
    "head+norm". "auto": "head+norm" where `measured_on(device)` and this jax has Pallas's Triton backend;
    "head", "head+norm": wherever they apply (interpreted off a GPU, on a CPU or TPU: slow, for tests). Only a
    linear head with cross-entropy alone (no Dice term) is fused; "head+norm" needs batch norm (else "head")."""
    choice = config.loss.fused_head
    if choice == "off" or config.model.head != "linear" or config.loss.dice_weight:
        return None
    device = device or jax.devices()[0]  # Triton is imported only where the kernel would run on it
    if choice == "auto":
        if not measured_on(device) or triton_missing():
            return None
        choice = "head+norm"
    elif device.platform == "gpu" and triton_missing():
        from fcn.config import ConfigError

        raise ConfigError(f"config.loss.fused_head={choice!r} needs {triton_missing()}; 'auto' or 'off' trains unfused")
    return "head" if choice == "head+norm" and config.model.norm != "batch" else choice


def usable_mode(mode: str | None, model, x_shape: tuple[int, ...]) -> str | None:
    """`mode` for this model (a fcn.model.UNet in training) and input shape, or what of it applies."""
    from fcn import norm

    if mode is None or fits(model.features_shape(x_shape, prescaled=True)) is None:
        return None
    if mode == "head+norm" and not (model.depth and norm.fusable_bn_relu(model.up_blocks[-1].norms[-1])):
        return "head"
    return mode


def fused_loss(model, x_BHWC, labels_BHW, mode: str, *, rngs, ignore_label: int, class_weights_K=None, **kernel):
    """(loss, correct) of the training-mode model on prescaled images, its end fused by `mode`
    ("head" or "head+norm", from `usable_mode`); batch norm's running statistics are updated."""
    from fcn import norm

    head = model.head.layers[0]
    head_bias = None if head.bias is None else head.bias[...]
    args = dict(ignore_label=ignore_label, class_weights_K=class_weights_K, **kernel)
    if mode == "head":
        features_BHWC = model.features(x_BHWC, rngs=rngs, prescaled=True)
        return linear_head_cross_entropy(features_BHWC, head.kernel[...], head_bias, labels_BHW, **args)
    x_BHWC, last = model.features(x_BHWC, rngs=rngs, prescaled=True, last_norm=False)
    bn = last.norm
    (loss, correct), (mean_C, var_C) = linear_head_cross_entropy(
        x_BHWC, head.kernel[...], head_bias, labels_BHW, bn=(bn.scale[...], bn.bias[...], bn.epsilon), **args
    )
    norm.update_running_stats(bn, mean_C, var_C)
    return loss, correct


def linear_head_cross_entropy(
    features_BHWC: jax.Array,
    kernel_11CK: jax.Array,
    bias_K: jax.Array | None,
    labels_BHW: jax.Array,
    *,
    ignore_label: int = 255,
    class_weights_K: jax.Array | None = None,
    bn: tuple | None = None,
    interpret: bool | None = None,
    sub: int | None = None,
    steps: int = STEPS,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
):
    """(loss, correct): `fcn.losses.cross_entropy` of the 1x1 head's logits, and the count of valid
    pixels whose argmax is their label.

    features_BHWC: the head's input at the network's padded size (rows and columns beyond the
      labels' count as ignored, as the network's cropped logits do).
    kernel_11CK, bias_K: the head's 1x1 convolution (nnx.Conv's kernel [1, 1, C, K]).
    bn: (scale, bias, epsilon) of a training-mode batch norm and ReLU to apply to `features_BHWC`
      first; the result is then ((loss, correct), (batch mean, batch variance)).
    interpret: run the kernel in Pallas's interpreter (default: off a GPU).
    sub, steps, num_warps, num_stages: the most pixels an instance takes at a time (default:
      BLOCK_VALUES / channels), the most such steps in its loop, Triton's warps and stages.

    With several devices each runs the kernel on its share of the batch (fcn.sharding's `data`
    axis). The shapes must suit the kernel (`fits`; `usable_mode` checks before training calls).
    """
    b, hp, wp, c = features_BHWC.shape
    _, h, w = labels_BHW.shape
    k = kernel_11CK.shape[-1]
    if (sub := fits(features_BHWC.shape, sub)) is None:
        raise ValueError(f"features of shape {features_BHWC.shape} do not suit the fused head kernel (block_pixels)")
    kernel_CK = kernel_11CK.reshape(c, k).astype(jnp.float32)
    bias_K = jnp.zeros((k,), jnp.float32) if bias_K is None else bias_K.astype(jnp.float32)
    labels_BHW = jnp.pad(labels_BHW, ((0, 0), (0, hp - h), (0, wp - w)), constant_values=ignore_label)
    valid = losses.valid_pixels(labels_BHW, k, ignore_label)  # as the unfused loss: a label K.. weighs nothing
    safe = jnp.where(valid, labels_BHW, 0).astype(jnp.int32)
    weights_K = jnp.ones((k,), jnp.float32) if class_weights_K is None else jnp.asarray(class_weights_K, jnp.float32)
    total = jnp.sum(jnp.where(valid, weights_K.reshape(k)[safe], 0.0))
    kp = 1 << (max(k, 16) - 1).bit_length()  # the classes padded to a power of two
    normed_Kp = jnp.pad(weights_K.reshape(k) / jnp.maximum(total, 1e-12), (0, kp - k))
    kernel_CKp = jnp.pad(kernel_CK, ((0, 0), (0, kp - k)))
    bias_Kp = jnp.pad(bias_K, (0, kp - k), constant_values=_NEG)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    block = program_pixels(b // jax.device_count() * hp * wp, sub, steps)
    setting = (ignore_label, block, sub, num_warps, num_stages, bool(interpret), jax.device_count())
    args = (features_BHWC.reshape(-1, c), kernel_CKp, bias_Kp, labels_BHW.reshape(-1), normed_Kp)
    if bn is None:
        return _fused(*setting)(*args)
    scale_C, bn_bias_C, epsilon = bn
    fused = _fused_bn(*setting, float(epsilon))
    return fused(*args, scale_C.astype(jnp.float32), bn_bias_C.astype(jnp.float32))


def _kernel(*refs, ignore_label: int, bn: bool, sub: int):
    """One block of pixels, `sub` at a time: [P, C] features (or, with `bn`, the conv output that
    batch norm + ReLU make them from), [P] labels -> the gradient at the features (at the batch
    norm's output), and the block's sums: the head's weight and bias gradients, loss, correct count
    (and batch norm's two gradient sums)."""
    from jax.experimental import pallas as pl

    if bn:
        x_ref, y_ref, w_ref, b_ref, n_ref, mean_ref, mul_ref, shift_ref, dx_ref, dw_ref, db_ref, aux_ref, ds_ref = refs
    else:
        x_ref, y_ref, w_ref, b_ref, n_ref, dx_ref, dw_ref, db_ref, aux_ref = refs
    (block, c), k = x_ref.shape, w_ref.shape[1]
    f32 = jnp.float32

    def features(rows):
        """The head's input in the compute dtype, and (with `bn`) its values before the ReLU in float32."""
        x_PC = x_ref[rows, :]
        if not bn:
            return x_PC, None
        # As fcn.norm._bn_forward: (x - mean) * (rsqrt(var + eps) * scale) + bias in float32.
        pre_PC = (x_PC.astype(f32) - mean_ref[...][None, :]) * mul_ref[...][None, :] + shift_ref[...][None, :]
        return jnp.maximum(pre_PC, 0.0).astype(x_PC.dtype), pre_PC

    def step(i, sums):
        dw_CK, db_K, loss, correct, ds_2C = sums
        rows = pl.ds(pl.multiple_of(i * sub, sub), sub)
        f_PC, _ = features(rows)
        y_P = y_ref[rows].astype(jnp.int32)
        w_CK = w_ref[...].astype(f_PC.dtype)
        logits_PK = jnp.dot(f_PC, w_CK, preferred_element_type=f32) + b_ref[...][None, :]
        onehot_PK = jax.lax.broadcasted_iota(jnp.int32, (sub, k), 1) == y_P[:, None]
        top_P1 = jnp.max(logits_PK, axis=1, keepdims=True)
        e_PK = jnp.exp(logits_PK - top_P1)
        sum_P1 = jnp.sum(e_PK, axis=1, keepdims=True)
        picked_P1 = jnp.sum(jnp.where(onehot_PK, logits_PK, 0.0), axis=1, keepdims=True)
        # The pixel's class weight over the batch's total: 0 for ignored pixels (no class matches).
        weight_P1 = jnp.sum(jnp.where(onehot_PK, n_ref[...][None, :], 0.0), axis=1, keepdims=True)
        loss += jnp.sum(weight_P1 * (top_P1 + jnp.log(sum_P1) - picked_P1))
        correct += jnp.sum(((jnp.argmax(logits_PK, axis=1) == y_P) & (y_P != ignore_label)).astype(f32))
        grad_PK = (e_PK / sum_P1 - onehot_PK.astype(f32)) * weight_P1
        g_PK = grad_PK.astype(f_PC.dtype)
        nt = (((1,), (1,)), ((), ()))  # grad [P, K] . kernel [C, K] over K
        df_PC = jax.lax.dot_general(g_PK, w_CK, nt, preferred_element_type=f32)
        if bn:  # the ReLU's mask, from values computed again rather than kept (registers)
            x_PC = x_ref[rows, :].astype(f32)
            _, pre_PC = features(rows)
            d_PC = jnp.where(pre_PC > 0, df_PC.astype(f_PC.dtype), 0).astype(f32)  # as the unfused bf16 dy
            dx_ref[rows, :] = d_PC.astype(dx_ref.dtype)
            row_21 = jax.lax.broadcasted_iota(jnp.int32, (2, 1), 0)
            ds_2C += jnp.where(row_21 == 0, jnp.sum(d_PC, axis=0)[None, :], jnp.sum(d_PC * x_PC, axis=0)[None, :])
        else:
            dx_ref[rows, :] = df_PC.astype(dx_ref.dtype)
        tn = (((0,), (0,)), ((), ()))  # features [P, C] . grad [P, K] over P
        # The features read (and normalised) again rather than kept: fewer registers (docs/benchmarks.md).
        dw_CK += jax.lax.dot_general(features(rows)[0], g_PK, tn, preferred_element_type=f32)
        return dw_CK, db_K + jnp.sum(grad_PK, axis=0), loss, correct, ds_2C

    zero = jnp.zeros((), f32)
    init = (jnp.zeros((c, k), f32), jnp.zeros((k,), f32), zero, zero, jnp.zeros((2, c), f32))
    dw_CK, db_K, loss, correct, ds_2C = jax.lax.fori_loop(0, block // sub, step, init)
    dw_ref[...] = dw_CK
    db_ref[...] = db_K
    col_K = jax.lax.broadcasted_iota(jnp.int32, (k,), 0)
    aux_ref[...] = jnp.where(col_K == 0, loss, jnp.where(col_K == 1, correct, 0.0))
    if bn:
        ds_ref[...] = ds_2C


def _call(*inputs, ignore_label, bn, block, sub, num_warps, num_stages, interpret):
    """The kernel over every block of pixels: (dx [P, C], then per block: dW [N, C, K], db [N, K],
    (loss, correct, 0...) [N, K], and with `bn` (sum d, sum d x) [N, 2, C])."""
    from jax.experimental import pallas as pl

    x_PC, _, w_CK = inputs[:3]
    (num_pixels, c), k = x_PC.shape, w_CK.shape[1]
    blocks = num_pixels // block
    f32 = jnp.float32
    whole = lambda *shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    in_specs = [pl.BlockSpec((block, c), lambda i: (i, 0)), pl.BlockSpec((block,), lambda i: (i,))]
    in_specs += [whole(c, k), whole(k), whole(k)] + [whole(c)] * (3 if bn else 0)
    out_specs = [
        pl.BlockSpec((block, c), lambda i: (i, 0)),
        pl.BlockSpec((None, c, k), lambda i: (i, 0, 0)),
        pl.BlockSpec((None, k), lambda i: (i, 0)),
        pl.BlockSpec((None, k), lambda i: (i, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((num_pixels, c), x_PC.dtype),
        jax.ShapeDtypeStruct((blocks, c, k), f32),
        jax.ShapeDtypeStruct((blocks, k), f32),
        jax.ShapeDtypeStruct((blocks, k), f32),
    ]
    if bn:
        out_specs.append(pl.BlockSpec((None, 2, c), lambda i: (i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((blocks, 2, c), f32))
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        functools.partial(_kernel, ignore_label=ignore_label, bn=bn, sub=sub),
        grid=(blocks,),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        name="fcn_head_cross_entropy",
        **params,
    )(*inputs)


def _kernel_call(bn, ignore_label, block, sub, num_warps, num_stages, interpret, devices):
    """`_call` for one static setting; with several devices, each on its share of the pixels under
    shard_map (the per-block outputs stay split, and XLA adds them up)."""
    call = functools.partial(
        _call,
        ignore_label=ignore_label,
        bn=bn,
        block=block,
        sub=sub,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )
    if devices == 1:
        return call
    from jax.sharding import PartitionSpec as P

    from fcn import sharding

    split, whole = P("data"), P()
    in_specs = (split, split, whole, whole, whole) + (whole,) * (3 if bn else 0)  # x, y, w, b, n(, bn's)
    return jax.shard_map(
        call, mesh=sharding.make_mesh(), in_specs=in_specs, out_specs=(split,) * (5 if bn else 4), check_vma=False
    )


def _sums(aux_NK, dw_NCK, db_NK):
    """(loss, correct count), dW, db from the per-block outputs."""
    loss = jnp.sum(aux_NK[:, 0])
    # Each block's count (at most `block`) is exact in float32; their sum is taken in integers.
    correct = jnp.sum(aux_NK[:, 1].astype(jnp.int32)).astype(jnp.float32)
    return (loss, correct), jnp.sum(dw_NCK, axis=0), jnp.sum(db_NK, axis=0)


@functools.cache
def _fused(*setting):
    """The kernel as a differentiable function of (features, kernel, bias), for one static setting
    (ignore_label, block, sub, num_warps, num_stages, interpret, devices)."""
    call = _kernel_call(False, *setting)

    @jax.custom_vjp
    def fused(x_PC, w_CK, b_K, y_P, n_K):
        return fused_fwd(x_PC, w_CK, b_K, y_P, n_K)[0]

    def fused_fwd(x_PC, w_CK, b_K, y_P, n_K):
        dx_PC, dw_NCK, db_NK, aux_NK = call(x_PC, y_P, w_CK, b_K, n_K)
        out, dw_CK, db_K = _sums(aux_NK, dw_NCK, db_NK)
        return out, (dx_PC, dw_CK, db_K)

    def fused_bwd(res, cotangents):
        dx_PC, dw_CK, db_K = res
        g = cotangents[0]  # the loss's; the count has no gradient
        return (g.astype(dx_PC.dtype) * dx_PC, g * dw_CK, g * db_K, None, None)

    fused.defvjp(fused_fwd, fused_bwd)
    return fused


@functools.cache
def _fused_bn(*setting_and_epsilon):
    """As `_fused`, with batch norm + ReLU before the head: a differentiable function of (the
    last conv's output, kernel, bias, ..., batch norm's scale and bias) ->
    ((loss, correct), (batch mean, batch variance))."""
    from fcn import norm

    *setting, epsilon = setting_and_epsilon
    call = _kernel_call(True, *setting)

    @jax.custom_vjp
    def fused(x_PC, w_CK, b_K, y_P, n_K, scale_C, bias_C):
        return fused_fwd(x_PC, w_CK, b_K, y_P, n_K, scale_C, bias_C)[0]

    def fused_fwd(x_PC, w_CK, b_K, y_P, n_K, scale_C, bias_C):
        mean_C, var_C = norm.batch_stats(x_PC)
        inv_C = jax.lax.rsqrt(var_C + epsilon)
        d_PC, dw_NCK, db_NK, aux_NK, ds_N2C = call(x_PC, y_P, w_CK, b_K, n_K, mean_C, inv_C * scale_C, bias_C)
        out, dw_CK, db_K = _sums(aux_NK, dw_NCK, db_NK)
        dsum_C, dxsum_C = jnp.sum(ds_N2C, axis=0)
        return (out, (mean_C, var_C)), (x_PC, d_PC, mean_C, inv_C, scale_C, dsum_C, dxsum_C, dw_CK, db_K)

    def fused_bwd(res, cotangents):
        x_PC, d_PC, mean_C, inv_C, scale_C, dsum_C, dxsum_C, dw_CK, db_K = res
        g = cotangents[0][0]  # the loss's; the count and the statistics have no gradient
        d_PC = g * d_PC.astype(jnp.float32)
        dx_PC, dscale_C, dbias_C = norm.bn_grad_from_sums(x_PC, d_PC, mean_C, inv_C, scale_C, g * dsum_C, g * dxsum_C)
        return (dx_PC, g * dw_CK, g * db_K, None, None, dscale_C, dbias_C)

    fused.defvjp(fused_fwd, fused_bwd)
    return fused
