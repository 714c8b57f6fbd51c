"""Backend-specific convolution implementations, behind one seam.

`conv_fn(name)` returns the `conv_general_dilated` that every conv of the
model uses (`config.model.conv_impl`); `ConvTranspose` routes the transposed
(upsampling) convs through the same function.

  "xla"    jax.lax's own convolution everywhere.
  "gemm"   the convolutions XLA:CPU is slow at, rewritten as matrix products;
           every other convolution is jax.lax's:
           - a transposed conv whose kernel equals its stride (the U-Net's 2x2,
             stride-2 upsampling) is one product [B*H*W, C] x [C, s*s*K] and a
             depth-to-space reshape. XLA:CPU runs it as an input-dilated
             convolution whose weight gradient goes to a generic convolution
             with an image-sized window: 40% of the default U-Net's training
             step on CPU, against 2% as a product (benchmarks/profile_step.py);
           - a 1x1 conv is the product [B*H*W, C] x [C, K] (its gradients,
             3-4x faster than the convolution's).
           3x3 convs stay jax.lax's: every rewrite in jax tried (nine shifted
           products, im2col, lax patches) ran 1.1-2.5x slower than XLA's.
  "onednn" "gemm", with the 3x3 convs (any float32 NHWC conv without dilation
           or groups, and bfloat16 ones where the CPU has fast code for them:
           fcn.onednn.supports) by oneDNN through XLA's FFI (fcn.onednn): forward, input
           and weight gradient; the products of the 1x1 convs and of the
           upsampling too, as oneDNN 1x1 convolutions (XLA:CPU ran their weight
           gradients, a sum over every pixel into a few hundred numbers, on one
           core: 23 ms of a camvid_cpu step for the head against 10 ms, on a
           2-core Xeon). The U-Net's batch norm + ReLU after such a conv runs
           by oneDNN too (fcn.norm: in training, and folded into the conv in
           inference). CPU only; an error where oneDNN is
           not available (fcn.onednn.unavailable_reason() says why).
  "auto"   on the CPU "onednn" where it is available, else "gemm" (with a
           warning that says why; the training step is then compiled with
           `train_compiler_options`: XLA's Eigen kernels for its convolutions
           instead of YNNPACK's); elsewhere "gemm": on an H200 (bfloat16,
           16 x 360 x 480) its training step took 15 ms against "xla"'s 30 ms
           (docs/benchmarks.md; no TPU has been measured).

Every rewrite computes the same function as jax.lax.conv_general_dilated, values
and gradients (tests/test_ops.py). `portable()` keeps oneDNN out of code traced
to run elsewhere (fcn.export). Measurements: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from fcn import onednn
from fcn.layers import add_bias, pair

CONV_IMPLS = ("xla", "gemm", "onednn", "auto")
logger = logging.getLogger(__name__)

# Dimension numbers of NHWC inputs and outputs with HWIO kernels (flax's).
_NHWC = (0, 3, 1, 2)
_HWIO = (3, 2, 0, 1)


def conv_fn(name: str) -> Callable | None:
    """The convolution primitive for `config.model.conv_impl`; None = jax.lax's default."""
    if name == "xla":
        return None
    if name == "gemm":
        return conv_general_dilated
    if name == "onednn":
        if not onednn.available():
            raise RuntimeError(f"model.conv_impl='onednn': {onednn.unavailable_reason()}")
        return functools.partial(conv_general_dilated, onednn_ok=True)
    if name == "auto":
        return _auto
    raise ValueError(f"model.conv_impl={name!r}: expected one of {', '.join(CONV_IMPLS)}")


def _auto(*args, **kwargs):
    # Decided at trace time: one process traces for one backend. Off the CPU: "gemm".
    return conv_general_dilated(*args, onednn_ok=jax.default_backend() == "cpu" and _onednn_usable(), **kwargs)


@functools.cache
def _onednn_usable() -> bool:
    """fcn.onednn.available(), with a warning (once) when it is not and nobody turned it off."""
    if onednn.available():
        return True
    if onednn.unavailable_reason() != onednn.TURNED_OFF:
        logger.warning("oneDNN convolutions unavailable, XLA's instead: %s", onednn.unavailable_reason())
    return False


_portable = contextvars.ContextVar("fcn_ops_portable", default=False)


@contextlib.contextmanager
def portable():
    """While inside, convolutions are traced without custom calls: for artifacts that run elsewhere."""
    token = _portable.set(True)
    try:
        yield
    finally:
        _portable.reset(token)


# XLA:CPU's YNNPACK library fusions (jaxlib 0.10) less its convolutions: reductions and
# matrix products stay YNNPACK's. Its default is these two plus individual convolutions.
_YNN_WITHOUT_CONVOLUTIONS = (
    ("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),
)


def train_compiler_options(name: str) -> dict | None:
    """jax.jit compiler options for the training step under `config.model.conv_impl` = name.

    "auto" on the CPU without oneDNN: 3x3 convolutions by XLA's Eigen kernels,
    not YNNPACK's. YNNPACK runs the convolutions of the U-Net's middle levels on
    one core, Eigen's use both (benchmarks/conv_threads.py). The whole training
    step (median of 5-7, alternating in one process, 2-core AMD EPYC): default
    network 4 x 256 x 256 1869 -> 1309 ms, configs/camvid_cpu.py 670 -> 643 ms.
    Evaluation and inference keep YNNPACK: the default network's forward pass
    was 6% slower without it (docs/benchmarks.md). With oneDNN no convolution is
    left to XLA, and elsewhere jax's defaults apply: None.
    """
    if name not in CONV_IMPLS:
        conv_fn(name)  # raises, naming the choices
    if name == "auto" and jax.default_backend() == "cpu" and not _onednn_usable():
        return dict(_YNN_WITHOUT_CONVOLUTIONS) if _accepted(_YNN_WITHOUT_CONVOLUTIONS) else None
    return None


@functools.cache
def _accepted(options: tuple) -> bool:
    """Whether this jaxlib compiles with `options` (another version may name them otherwise)."""
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(compiler_options=dict(options))
    except Exception as e:  # noqa: BLE001 -- XLA reports an unknown option or value as a runtime error
        logger.warning("compiler options %s not accepted by this jaxlib (%s); jax's defaults instead", options, e)
        return False
    return True


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    onednn_ok: bool = False,
    **kwargs,
):
    """jax.lax.conv_general_dilated, with the cases XLA:CPU is slow at done as matrix products,
    and with `onednn_ok` all of them by oneDNN where fcn.onednn supports them (the products as
    1x1 convolutions)."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    kind = _gemm_kind(*args, feature_group_count, batch_group_count)
    onednn_ok = onednn_ok and _onednn_operands(lhs, rhs, preferred_element_type)
    if kind:
        # With oneDNN, the products as 1x1 convolutions: its weight gradient splits the long
        # sum over pixels across the cores, where XLA:CPU's product ran on one.
        pixelwise = _onednn_1x1 if onednn_ok else functools.partial(_dot_1x1, precision, preferred_element_type)
        return pixelwise(lhs, rhs) if kind == "1x1" else _depth_to_space_conv(lhs, rhs, kind, pixelwise)
    pads = _onednn_pads(*args, feature_group_count, batch_group_count) if onednn_ok else None
    if pads is not None:
        return onednn.conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)
    return lax.conv_general_dilated(
        *args,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )


def _dot_1x1(precision, preferred_element_type, x_BHWC, w_11CK):
    """The 1x1 convolution as one matrix product [B*H*W, C] x [C, K].

    Two-dimensional operands: XLA:CPU then runs one matrix product with no
    layout copies (a 4-D einsum of the same product ran 2-3x slower).
    """
    b, h, w, c = x_BHWC.shape
    y = jnp.dot(
        x_BHWC.reshape(b * h * w, c),
        w_11CK.reshape(c, -1),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return y.reshape(b, h, w, -1)


def _onednn_1x1(x_BHWC, w_11CK):
    return onednn.conv(x_BHWC, w_11CK, (1, 1), ((0, 0), (0, 0)))


def _onednn_here() -> bool:
    """One CPU device, and not tracing for elsewhere (`portable`)."""
    return not _portable.get() and jax.default_backend() == "cpu" and jax.device_count() == 1


def _onednn_arrays(*arrays) -> bool:
    """Arrays of one data type that fcn.onednn supports here (float32; bfloat16 where the CPU has
    fast code for it) and of concrete shapes (not symbolic, as in export), none empty."""
    if len({a.dtype for a in arrays}) != 1 or not onednn.supports(arrays[0].dtype):
        return False
    return all(all(isinstance(d, int) and d > 0 for d in a.shape) for a in arrays)


def _onednn_operands(lhs, rhs, preferred) -> bool:
    """Whether fcn.onednn.conv takes these operands here: NHWC/HWIO of concrete shapes, one CPU."""
    if not _onednn_here() or lhs.ndim != 4 or rhs.ndim != 4 or preferred not in (None, lhs.dtype):
        return False
    return _onednn_arrays(lhs, rhs)


def _seam_uses_onednn(seam) -> bool:
    """Whether convolutions through `seam` (a conv_fn result) go to oneDNN here."""
    if seam is _auto:
        return jax.default_backend() == "cpu" and _onednn_usable()
    return isinstance(seam, functools.partial) and seam.func is conv_general_dilated and seam.keywords.get("onednn_ok")


def runs_on_onednn(conv: nnx.Conv, x_BHWC) -> bool:
    """Whether `conv` runs on oneDNN here and so can its output x (of a type and shape oneDNN takes):
    then oneDNN can do the work that follows the conv too (fcn.norm: batch norm + ReLU)."""
    return _seam_uses_onednn(conv.conv_general_dilated) and _onednn_here() and _onednn_arrays(x_BHWC)


def onednn_geometry(conv: nnx.Conv, x_BHWC, kernel):
    """(strides, pads) when oneDNN runs this nnx.Conv on x with `kernel` (both of the conv's dtype) in
    one call (with a bias and a ReLU: fcn.norm.conv_bias_relu), else None. For convs that compute
    conv_general_dilated(x, kernel, strides, padding) (no mask, groups or dilation; fcn.norm checks)."""
    if not _seam_uses_onednn(conv.conv_general_dilated):
        return None
    if not _onednn_operands(x_BHWC, kernel, conv.preferred_element_type):
        return None
    strides = pair(conv.strides)
    pads = _onednn_pads(x_BHWC, kernel, strides, conv.padding, None, None, ("NHWC", "HWIO", "NHWC"), 1, 1)
    return None if pads is None else (strides, pads)


def _onednn_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dn, groups, batch_groups):
    """((lo, hi), (lo, hi)) when fcn.onednn.conv computes this convolution (operands checked), else None."""
    if groups != 1 or batch_groups != 1:
        return None
    if tuple(lhs_dilation or (1, 1)) != (1, 1) or tuple(rhs_dilation or (1, 1)) != (1, 1):
        return None
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
    if tuple(dn.lhs_spec) != _NHWC or tuple(dn.rhs_spec) != _HWIO or tuple(dn.out_spec) != _NHWC:
        return None
    pads = tuple(onednn.padding_pairs(padding, lhs.shape[1:3], rhs.shape[:2], window_strides))
    if min(v for p in pads for v in p) < 0 or min(window_strides) < 1:
        return None
    if any(n + lo + hi < k for n, (lo, hi), k in zip(lhs.shape[1:3], pads, rhs.shape[:2])):
        return None  # an empty output
    return pads


def _gemm_kind(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dn, groups, batch_groups):
    """ "1x1", s (a transposed conv with an s x s kernel and stride s), or None: how to run this conv.

    Only NHWC inputs with HWIO kernels, one feature group, no kernel dilation.
    The transposed conv is lax.conv_transpose(x, w, (s, s), "SAME" or "VALID"):
    input dilation s, padding s - 1 on each side, unit window strides. Each
    output pixel (s*i + r, s*j + q) then sees exactly one input pixel, (i, j),
    through the kernel tap (s - 1 - r, s - 1 - q).
    """
    if lhs.ndim != 4 or groups != 1 or batch_groups != 1:
        return None
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)
    if tuple(dn.lhs_spec) != _NHWC or tuple(dn.rhs_spec) != _HWIO or tuple(dn.out_spec) != _NHWC:
        return None
    if tuple(rhs_dilation or (1, 1)) != (1, 1) or tuple(window_strides) != (1, 1):
        return None
    s = rhs.shape[0]
    if rhs.shape[1] != s:
        return None
    pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding) if isinstance(padding, str) else padding
    pads = [tuple(p) for p in pads]
    dilation = tuple(lhs_dilation or (1, 1))
    if s == 1 and dilation == (1, 1) and pads == [(0, 0)] * 2:
        return "1x1"
    if s > 1 and dilation == (s, s) and pads == [(s - 1, s - 1)] * 2:
        return s
    return None


def _depth_to_space_conv(x_BHWC, w_SSCK, s: int, conv_1x1):
    """out[b, s*i + r, s*j + q, k] = sum_c x[b, i, j, c] * w[s - 1 - r, s - 1 - q, c, k].

    One 1x1 convolution from C to s*s*K channels (`conv_1x1`), then depth to space.
    """
    b, h, w, c = x_BHWC.shape
    k = w_SSCK.shape[-1]
    w_11CN = w_SSCK[::-1, ::-1].transpose(2, 0, 1, 3).reshape(1, 1, c, s * s * k)
    y_BHWSSK = conv_1x1(x_BHWC, w_11CN).reshape(b, h, w, s, s, k)
    return y_BHWSSK.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, k)


def conv_transpose_padding(kernel: int, stride: int, padding: str) -> tuple[int, int]:
    """The padding lax.conv_transpose gives its input-dilated convolution ("SAME" or "VALID")."""
    if padding == "SAME":
        pad_len = kernel + stride - 2
        before = kernel - 1 if stride > kernel - 1 else -(-pad_len // 2)
    elif padding == "VALID":
        pad_len = kernel + stride - 2 + max(kernel - stride, 0)
        before = kernel - 1
    else:
        raise ValueError(f"padding={padding!r}: expected 'SAME' or 'VALID'")
    return before, pad_len - before


class ConvTranspose(nnx.ConvTranspose):
    """nnx.ConvTranspose whose convolution goes through `conv_general_dilated` (the seam).

    Same parameters (kernel [kh, kw, in, out], bias) as nnx.ConvTranspose, so
    checkpoints are interchangeable. With conv_general_dilated=None, or a
    configuration other than SAME/VALID padding on NHWC inputs without mask,
    kernel dilation or kernel transposition, it is nnx.ConvTranspose itself.
    """

    def __init__(self, *args, conv_general_dilated: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_general_dilated = conv_general_dilated

    def __call__(self, inputs):
        plain = (
            self.conv_general_dilated is None
            or inputs.ndim != 4
            or self.mask is not None
            or self.transpose_kernel
            or self.kernel_dilation not in (None, 1, (1, 1))
            or self.padding not in ("SAME", "VALID")
        )
        if plain:
            return super().__call__(inputs)
        strides = self.strides or 1
        strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
        pads = [conv_transpose_padding(k, s, self.padding) for k, s in zip(kernel.shape[:2], strides)]
        y = self.conv_general_dilated(
            inputs,
            kernel,
            (1, 1),
            pads,
            lhs_dilation=strides,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
        )
        return y if bias is None else add_bias(y, self.bias[...])
