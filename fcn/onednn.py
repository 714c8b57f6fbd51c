"""3x3 (any k x k) convolutions, and batch norm + ReLU, on XLA:CPU by oneDNN, through XLA's FFI.

XLA:CPU's own convolutions (Eigen, YNNPACK) are slowest where the U-Net is
widest: at the full-resolution level (16-32 channels) the weight gradient ran at
about 40 GFLOP/s. oneDNN, the library PyTorch's CPU convolutions use, ran the
same three convolutions (forward, input and weight gradient) 4-5x faster on the
same two cores (docs/benchmarks.md, fifth session).

`conv(x, w, strides, padding)` is a jax function with a custom VJP whose
forward pass and both gradients are XLA custom calls into oneDNN
(fcn/csrc/: onednn_conv.cc, onednn_bn.cc). fcn.ops uses it for `conv_impl` "onednn", and for
"auto" on a CPU when `available()`; everything else keeps jax.lax's.
`conv_bias_relu(x, w, b, ...)` is max(conv + b, 0) in one call, for inference:
the U-Net folds batch norm's running statistics into w and b (fcn.model.ConvBlock).
`bn_relu(x, scale, shift, epsilon)` is batch norm on the batch's statistics and a
ReLU, for training: oneDNN's batch normalization with the ReLU fused, its gradient
oneDNN's too (reading the ReLU's mask from the workspace, a bit per value, that the
forward pass kept). Forward and gradient took about half the time of XLA:CPU's
(docs/benchmarks.md, the fourteenth session).

The handlers are compiled at first use (fcn/onednn_build.py: with which compiler and
oneDNN, kept where, and what it removes) and loaded; anything missing makes
`available()` False with the reason in `unavailable_reason()`. `FCN_ONEDNN=0` turns it off.

Data types: float32, and bfloat16 where `supports("bfloat16")`: the CPU has bfloat16
instructions (AVX-512 BF16 or AMX) and oneDNN fast code for them. `impls(dtype)` names the
instruction set and the implementations picked. Without those instructions oneDNN converts
as it goes, 3x slower than float32 in camvid_cpu's training step, so bfloat16 stays on XLA's
convolutions there. One type for a call's activations and kernel; the bias, batch norm's
scale, shift and statistics are float32, and so are the sums inside each primitive. On a
2-core Xeon with AMX, fcn's bfloat16 on oneDNN trained camvid_cpu's network 2.3-2.7x faster
than its float32, where on XLA's own convolutions it had been 2.5x slower (docs/benchmarks.md,
the twenty-seventh session).

Limits: NHWC inputs with HWIO kernels, no dilation or groups, concrete shapes,
one device. Their gradients cannot be differentiated again.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fcn.onednn_build import Unavailable, build, onednn_root

logger = logging.getLogger(__name__)

TARGETS = {  # custom-call target -> handler symbol in the built library
    "fcn_onednn_conv_fwd": "FcnOnednnConvFwd",
    "fcn_onednn_conv_bwd_data": "FcnOnednnConvBwdData",
    "fcn_onednn_conv_bwd_weights": "FcnOnednnConvBwdWeights",
    "fcn_onednn_conv_bias_relu": "FcnOnednnConvBiasRelu",
    "fcn_onednn_bn_relu_fwd": "FcnOnednnBnReluFwd",
    "fcn_onednn_bn_relu_bwd": "FcnOnednnBnReluBwd",
}
TURNED_OFF = "FCN_ONEDNN=0"  # unavailable_reason() when the user turned it off
_reason: str | None = None
_library: str | None = None  # the loaded handlers' file name, keyed by their sources, jaxlib and oneDNN


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True or was not asked yet)."""
    return _reason


@functools.cache
def available() -> bool:
    """Whether the oneDNN convolutions are built, loaded and registered with XLA (once per process)."""
    global _reason, _library
    try:
        if os.environ.get("FCN_ONEDNN", "1") == "0":
            raise Unavailable(TURNED_OFF)
        root = onednn_root()
        path = build(root)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            if path.exists():
                raise
            path = build(root)  # removed meanwhile by another process (unused a week): built again
            lib = ctypes.CDLL(str(path))
        _register(lib)
    except Unavailable as e:
        _reason = str(e)
        return False
    except OSError as e:  # a library that does not load
        _reason = f"cannot load the oneDNN convolutions: {e}"
        return False
    _library = path.name
    return True


def identity() -> str | None:
    """What a program traced with the handlers depends on beyond fcn's source, for keys of kept
    programs (fcn.traced): the loaded library (its name follows the sources, jaxlib and oneDNN's
    library file) and the implementations oneDNN picks here (`impls`: the CPU's instructions, or
    $ONEDNN_MAX_CPU_ISA). bn_relu's workspace size, fixed when a step is traced, follows both.
    None where not `available()`."""
    return f"{_library} {impls(jnp.float32)}" if available() else None


_registered: ctypes.CDLL | None = None


def _register(lib: ctypes.CDLL) -> None:
    """Register the handlers with XLA, once per process (XLA refuses a second library's)."""
    global _registered
    if _registered is None:
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        lib.FcnOnednnBnWorkspaceBytes.restype = ctypes.c_int64
        lib.FcnOnednnBnWorkspaceBytes.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
        lib.FcnOnednnImpls.restype = ctypes.c_int
        lib.FcnOnednnImpls.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int64]
        _registered = lib


DTYPES = (jnp.float32, jnp.bfloat16)


@functools.cache
def _probe(dtype) -> tuple[int, str]:
    buf = ctypes.create_string_buffer(1024)
    return _registered.FcnOnednnImpls(int(dtype == jnp.bfloat16), buf, len(buf)), buf.value.decode()


def impls(dtype) -> str:
    """The implementations oneDNN picks here for `dtype` ("fwd:brgconv:avx512_core_amx bwd_data:..."),
    or why it has none; for logs and benchmarks."""
    if not available():
        return f"none: {unavailable_reason()}"
    return _probe(jnp.dtype(dtype))[1]


def supports(dtype) -> bool:
    """Whether the handlers run `dtype` activations here with fast code: float32 wherever
    `available()`; bfloat16 where the CPU has bfloat16 instructions (asked of oneDNN once)."""
    dtype = jnp.dtype(dtype)
    if dtype not in DTYPES or not available():
        return False
    return dtype == jnp.float32 or _probe(dtype)[0] == 1


def padding_pairs(padding, in_hw: Sequence[int], window: Sequence[int], strides: Sequence[int]) -> list:
    """lax's padding ("SAME", "VALID" or pairs) as [(lo, hi), (lo, hi)] for the two spatial dims."""
    if isinstance(padding, str):
        return [tuple(p) for p in jax.lax.padtype_to_pads(in_hw, window, strides, padding)]
    return [tuple(int(v) for v in p) for p in padding]


def _out_size(n: int, k: int, s: int, lo: int, hi: int) -> int:
    return (n + lo + hi - k) // s + 1


def _attrs(strides, pads):
    return dict(strides=np.asarray(strides, np.int64), padding=np.asarray([v for p in pads for v in p], np.int64))


def _loaded(what: str) -> ctypes.CDLL:
    """The handlers' library, built, loaded and registered now if no call has asked yet (so that
    `conv` and `bn_relu` work as the first thing a process does); else a RuntimeError that says why."""
    if not available():
        raise RuntimeError(
            f"oneDNN's handlers (fcn.onednn) are unavailable, so {what} cannot run: {unavailable_reason()}"
        )
    return _registered


def _call(target: str, shape, *operands, strides, pads):
    _loaded(target)
    out = jax.ShapeDtypeStruct(tuple(shape), operands[0].dtype)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*operands, **_attrs(strides, pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x_BHWC, w_HWIO, strides: tuple, pads: tuple):
    """Cross-correlation of x [B, H, W, C] with w [KH, KW, C, K] (lax's convolution), both float32 or
    both bfloat16 (the output the same; the sums in float32)."""
    return _forward(x_BHWC, w_HWIO, strides, pads)


def _forward(x, w, strides, pads):
    (b, h, wd, _), (kh, kw, _, k) = x.shape, w.shape
    oh = _out_size(h, kh, strides[0], *pads[0])
    ow = _out_size(wd, kw, strides[1], *pads[1])
    return _call("fcn_onednn_conv_fwd", (b, oh, ow, k), x, w, strides=strides, pads=pads)


def _conv_fwd(x, w, strides, pads):
    return _forward(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, res, dy):
    x, w = res
    dy = dy.astype(x.dtype)
    dx = _call("fcn_onednn_conv_bwd_data", x.shape, dy, w, strides=strides, pads=pads)
    dw = _call("fcn_onednn_conv_bwd_weights", w.shape, x, dy, strides=strides, pads=pads)
    return dx, dw


conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_bias_relu(x_BHWC, w_HWIO, b_K, strides: tuple, pads: tuple):
    """max(conv(x, w) + b, 0) in one oneDNN call: the bias and the ReLU applied as the output is written.

    For inference, where batch norm's running statistics fold into w and b. x and w as `conv`'s,
    b float32. Its gradient (the ReLU's mask, then `conv`'s) lets it be differentiated all the same.
    """
    (b, h, wd, _), (kh, kw, _, k) = x_BHWC.shape, w_HWIO.shape
    oh = _out_size(h, kh, strides[0], *pads[0])
    ow = _out_size(wd, kw, strides[1], *pads[1])
    return _call("fcn_onednn_conv_bias_relu", (b, oh, ow, k), x_BHWC, w_HWIO, b_K, strides=strides, pads=pads)


def _bias_relu_fwd(x, w, b, strides, pads):
    y = conv_bias_relu(x, w, b, strides, pads)
    return y, (x, w, b, y)


def _bias_relu_bwd(strides, pads, res, dy):
    x, w, b, y = res
    d = jnp.where(y > 0, dy, 0).astype(x.dtype)
    dx, dw = _conv_bwd(strides, pads, (x, w), d)
    return dx, dw, d.astype(b.dtype).sum((0, 1, 2))


conv_bias_relu.defvjp(_bias_relu_fwd, _bias_relu_bwd)


def _workspace_bytes(shape, epsilon, dtype) -> int:
    """The size of the ReLU mask bn_relu's forward keeps for its gradient, as oneDNN lays it out
    (asked of the primitive the call will run, which is built here once, at trace time)."""
    size = _loaded("fcn_onednn_bn_relu_fwd").FcnOnednnBnWorkspaceBytes(
        *(int(v) for v in shape), float(epsilon), int(dtype == jnp.bfloat16)
    )
    if size < 0:
        raise ValueError(f"fcn.onednn.bn_relu: oneDNN has no batch normalization for shape {tuple(shape)}")
    return size


def _bn_relu_forward(x_BHWC, scale_C, shift_C, epsilon):
    c = x_BHWC.shape[-1]
    outs = (
        jax.ShapeDtypeStruct(x_BHWC.shape, x_BHWC.dtype),
        jax.ShapeDtypeStruct((c,), jnp.float32),
        jax.ShapeDtypeStruct((c,), jnp.float32),
        jax.ShapeDtypeStruct((_workspace_bytes(x_BHWC.shape, epsilon, x_BHWC.dtype),), jnp.uint8),
    )
    call = jax.ffi.ffi_call("fcn_onednn_bn_relu_fwd", outs, vmap_method="sequential")
    return call(x_BHWC, scale_C, shift_C, epsilon=np.float32(epsilon))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def bn_relu(x_BHWC, scale_C, shift_C, epsilon: float):
    """max(batch norm(x), 0) on the batch's statistics -> (y, batch mean, batch variance).

    x and y float32 or bfloat16; scale, shift and the statistics float32. The variance is the
    biased one (over the batch's B * H * W values per channel), as nnx.BatchNorm's. The gradient
    flows through y only.
    """
    y, mean_C, var_C, _ = _bn_relu_forward(x_BHWC, scale_C, shift_C, epsilon)
    return y, mean_C, var_C


def _bn_relu_fwd(x, scale, shift, epsilon):
    y, mean, var, workspace = _bn_relu_forward(x, scale, shift, epsilon)
    return (y, mean, var), (x, scale, mean, var, workspace)


def _bn_relu_bwd(epsilon, res, cotangents):
    x, scale, mean, var, workspace = res
    c = x.shape[-1]
    outs = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct((c,), jnp.float32),
        jax.ShapeDtypeStruct((c,), jnp.float32),
    )
    call = jax.ffi.ffi_call("fcn_onednn_bn_relu_bwd", outs, vmap_method="sequential")
    dy = cotangents[0].astype(x.dtype)
    return call(x, dy, scale, mean, var, workspace, epsilon=np.float32(epsilon))


bn_relu.defvjp(_bn_relu_fwd, _bn_relu_bwd)
