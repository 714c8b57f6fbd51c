"""The U-Net fully convolutional network: conv blocks, heads and any-size handling.

Any input size works. `UNet.__call__` pads H and W up to the next multiple of
2**depth, runs the network, and crops the logits back to H x W, so every 2x2
pooling sees an even size and every skip concatenation matches. The padding
mode (`pad_mode`, default "reflect") mirrors the image at its borders: border
pixels then see plausible context instead of black, which keeps their accuracy
close to that of interior pixels. Padding goes after the last row and column,
so padding an image up front, in the same mode, to the same multiple (as
evaluation does to batch images of different sizes) gives the very same
predictions.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from fcn import layers, ops, resize
from fcn.layers import max_pool_2x2
from fcn.norm import Norm, conv_bias_relu

HEADS = ("linear", "stacked", "mlp")
UPSAMPLES = ("transpose", "resize")
# config.model.pad_mode: the jnp.pad modes a model may use (fcn.export reproduces each for symbolic sizes).
PAD_MODES = ("reflect", "symmetric", "edge", "wrap", "constant")

# Per-channel statistics of natural RGB images in [0, 1] (ImageNet), used to
# centre the input; the network then needs no per-dataset preprocessing.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def input_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per input channel: ImageNet's R, G, B for the first three, and for any
    channel after those (in_channels > 3: RGBA, RGB + depth) the average of the three."""
    extra = max(0, channels - 3)
    return _MEAN[:channels] + (sum(_MEAN) / 3,) * extra, _STD[:channels] + (sum(_STD) / 3,) * extra


def _outside_traces(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def run_once_compiler_options() -> dict | None:
    """jax.jit compiler options for programs that run once (initialisers): on CPU, no LLVM optimisation.

    Optimising the random-number and inverse-erf code of the initialisers took
    most of their compilation time, for code that runs a single time.
    """
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


@functools.cache
def _unoptimised_jit(init: Callable) -> Callable:
    return jax.jit(init, static_argnums=(1, 2), compiler_options=run_once_compiler_options())


def eager_fast(init: Callable) -> Callable:
    """`init` (a jax.nn initialiser), except that called eagerly it runs as one jitted program, on CPU
    compiled without LLVM optimisation.

    Building a U-Net eagerly (`UNet(...)` in a notebook) compiled each initialiser's random-number
    code once per weight shape, about a second each on 2 CPU cores: 10.5-12.4 s for the default
    network, 3.9-4.3 s now (benchmarks/notebook_start.py).
    Under a trace it is `init` itself; fcn.state.create builds the state under one jit, compiled the
    same way, and gets the same values bit for bit. Against an optimised build they differ in
    rounding only (4.5e-8 for configs/camvid_cpu.py).
    """

    @functools.wraps(init)
    def wrapped(key, shape, dtype=jnp.float32, **kwargs):
        if _outside_traces(key) and not kwargs:  # (kwargs such as out_sharding: the plain path)
            return _unoptimised_jit(init)(key, tuple(shape), dtype)
        return init(key, shape, dtype, **kwargs)

    return wrapped


_KERNEL_INIT = eager_fast(nnx.initializers.lecun_normal())  # nnx.Conv's default, made quick to build eagerly


class ConvBlock(nnx.Module):
    """(optional 1x1 bottleneck -> ReLU ->) 3x3 conv -> norm -> ReLU, twice.

    With `bottleneck` = r > 0, each 3x3 conv is preceded by a 1x1 conv that
    reduces its input to max(1, c_in // r) channels followed by a ReLU
    (Network in Network, Inception): the 3x3 conv then costs r times less.
    """

    def __init__(self, c_in: int, c_out: int, *, norm: str, bottleneck: int, dtype, conv, rngs):
        self.reduce = nnx.List()
        self.convs = nnx.List()
        self.norms = nnx.List()
        for c in (c_in, c_out):
            if bottleneck:
                r = max(1, c // bottleneck)
                self.reduce.append(conv(c, r, (1, 1), rngs=rngs))
                c = r
            self.convs.append(conv(c, c_out, (3, 3), use_bias=norm == "none", rngs=rngs))
            self.norms.append(Norm(c_out, norm, dtype=dtype, rngs=rngs))

    def __call__(self, x_BHWC, *, last_norm: bool = True):
        """The block's output; with `last_norm` False, the last conv's output before its norm and ReLU."""
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            if len(self.reduce):
                x_BHWC = jax.nn.relu(self.reduce[i](x_BHWC))
            if not last_norm and i == len(self.convs) - 1:
                return conv(x_BHWC)
            folded = norm.folded()  # inference: batch norm folded into the conv
            y = None if folded is None else conv_bias_relu(conv, x_BHWC, *folded)
            x_BHWC = y if y is not None else norm(conv(x_BHWC), relu=True, conv=conv)
        return x_BHWC


class Head(nnx.Module):
    """The per-pixel classifier that ends the network.

    linear:  one 1x1 conv, a linear classifier applied at every pixel.
    stacked: 3x3 conv -> 3x3 conv -> 1x1 conv with no activation between; the
             composition is one linear map (a 5x5 conv), but it trains differently.
    mlp:     1x1 conv -> ReLU -> 1x1 conv, a per-pixel two-layer perceptron.
    """

    def __init__(self, c: int, num_classes: int, kind: str, *, conv, rngs):
        self.kind = kind
        if kind == "linear":
            self.layers = nnx.List([conv(c, num_classes, (1, 1), rngs=rngs)])
        elif kind == "stacked":
            self.layers = nnx.List(
                [conv(c, c, (3, 3), rngs=rngs), conv(c, c, (3, 3), rngs=rngs), conv(c, num_classes, (1, 1), rngs=rngs)]
            )
        elif kind == "mlp":
            self.layers = nnx.List([conv(c, c, (1, 1), rngs=rngs), conv(c, num_classes, (1, 1), rngs=rngs)])
        else:
            raise ValueError(f"model.head={kind!r}: expected one of {HEADS}")

    def __call__(self, x_BHWC):
        for i, layer in enumerate(self.layers):
            x_BHWC = layer(x_BHWC)
            if self.kind == "mlp" and i == 0:
                x_BHWC = jax.nn.relu(x_BHWC)
        return x_BHWC


class UNet(nnx.Module):
    """U-Net FCN: `model(x_BHWC)` -> logits [B, H, W, num_classes] for any H, W >= 1.

    Args:
      num_classes: K, channels of the final 1x1 conv (the per-pixel classifier).
      in_channels: C of the input images (3 for RGB).
      features: channels at the first level, doubled at each of `depth` levels.
      depth: number of 2x2 max-pool downsamplings (and of 2x upsamplings).
      norm: "batch", "group" or "none".
      upsample: "transpose" (2x2 transposed conv, stride 2) or "resize"
        (bilinear 2x resize, then a 3x3 conv).
      head: "linear", "stacked" or "mlp" (see `Head`).
      bottleneck: >0 adds a 1x1 reducing conv before each 3x3 conv of the conv blocks (see
        `ConvBlock`; not the head's nor the resize upsampling's).
      dropout: rate applied at the bottom of the U during training.
      dtype: compute dtype (jnp.float32 or jnp.bfloat16); parameters are float32
        and the logits are returned in float32.
      pad_mode: `jnp.pad` mode used to pad inputs to a multiple of 2**depth, one of PAD_MODES.
      input_scale: run the network on the image resized by this factor
        (antialiased bilinear) and resize the logits back (bilinear), so the
        output still has the input's H x W. 0.5 costs about 4x less compute,
        for every caller alike: training, evaluation, prediction and export.
      conv_general_dilated: the convolution primitive used by every conv (a seam
        for backend-specific implementations; default `jax.lax.conv_general_dilated`).
      rngs: parameter initialisation keys.

    Inputs are float images in [0, 1] with `in_channels` channels (integer images are refused, not
    rescaled); the model centres them itself (`input_stats`).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 3,
        features: int = 32,
        depth: int = 4,
        norm: str = "batch",
        upsample: str = "transpose",
        head: str = "linear",
        bottleneck: int = 0,
        dropout: float = 0.0,
        dtype=jnp.float32,
        pad_mode: str = "reflect",
        input_scale: float = 1.0,
        conv_general_dilated: Callable | None = None,
        rngs: nnx.Rngs,
    ):
        if not _is_int(num_classes) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r}: a segmentation model needs an integer >= 2 classes")
        _check_sizes(in_channels=in_channels, features=features)
        _check_sizes(depth=depth, bottleneck=bottleneck, least=0)
        if upsample not in UPSAMPLES:
            raise ValueError(f"model.upsample={upsample!r}: expected one of {UPSAMPLES}")
        if not 0 <= dropout < 1:
            raise ValueError(f"model.dropout={dropout!r}: expected a rate with 0 <= dropout < 1")
        if not _is_float_dtype(dtype):
            raise ValueError(f"model.dtype={dtype!r}: expected a floating dtype (jnp.float32 or jnp.bfloat16)")
        if not 0 < input_scale <= 1:
            raise ValueError(f"model.input_scale={input_scale}: expected 0 < input_scale <= 1")
        if pad_mode not in PAD_MODES:  # else only the first image of a size to pad would say so
            raise ValueError(f"model.pad_mode={pad_mode!r}: expected one of {PAD_MODES}")
        self.in_channels = in_channels
        self.num_classes, self.depth, self.dtype, self.pad_mode = num_classes, depth, dtype, pad_mode
        self.input_scale = input_scale
        self.upsample_kind = upsample
        extra = {} if conv_general_dilated is None else {"conv_general_dilated": conv_general_dilated}

        def conv(c_in, c_out, k, *, use_bias=True, rngs):
            return layers.Conv(
                c_in, c_out, k, use_bias=use_bias, dtype=dtype, kernel_init=_KERNEL_INIT, rngs=rngs, **extra
            )

        block = dict(norm=norm, bottleneck=bottleneck, dtype=dtype, conv=conv, rngs=rngs)
        widths = [features * 2**level for level in range(depth + 1)]
        self.down = nnx.List()
        c = in_channels
        for w in widths[:-1]:
            self.down.append(ConvBlock(c, w, **block))
            c = w
        self.bottom = ConvBlock(c, widths[-1], **block)
        self.dropout = nnx.Dropout(dropout) if dropout > 0 else None
        self.up = nnx.List()
        self.up_blocks = nnx.List()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1]):
            if upsample == "transpose":
                self.up.append(
                    ops.ConvTranspose(
                        w_low, w, (2, 2), strides=(2, 2), dtype=dtype, kernel_init=_KERNEL_INIT, rngs=rngs, **extra
                    )
                )
            else:
                self.up.append(conv(w_low, w, (3, 3), rngs=rngs))
            self.up_blocks.append(ConvBlock(2 * w, w, **block))
        self.head = Head(widths[0], num_classes, head, conv=conv, rngs=rngs)

    def _upsample(self, i: int, x_BHWC):
        if self.upsample_kind == "resize":
            h, w = x_BHWC.shape[1:3]
            x_BHWC = resize.linear(x_BHWC, (2 * h, 2 * w))  # jax.image.resize's "bilinear"
        return self.up[i](x_BHWC)

    def __call__(self, x_BHWC: jax.Array, *, rngs: nnx.Rngs | None = None, prescaled: bool = False) -> jax.Array:
        """Logits [B, H, W, K] in float32 for float images [B, H, W, C] in [0, 1].

        prescaled: the images were already resized by `input_scale` (training
        data is, once, at load time): skip the resizing in and out.
        """
        if x_BHWC.ndim != 4:
            raise ValueError(f"UNet expects images [B, H, W, C], got shape {x_BHWC.shape}")
        if _outside_traces(x_BHWC):  # eagerly (a notebook): one compiled program, not one per operation
            return _call_jitted(self, x_BHWC, rngs, prescaled)
        _, h, w, _ = x_BHWC.shape
        if h < 1 or w < 1:
            raise ValueError(f"UNet got an empty image of size {h}x{w}")
        hs, ws = (h, w) if prescaled else scaled_size(h, w, self.input_scale)
        return self.logits(self.features(x_BHWC, rngs=rngs, prescaled=prescaled), (hs, ws), (h, w))

    def features_shape(self, x_shape: tuple[int, ...], *, prescaled: bool = False) -> tuple[int, int, int, int]:
        """The shape of `features(x)` for images of shape `x_shape`."""
        b, h, w, _ = x_shape
        hs, ws = (h, w) if prescaled else scaled_size(h, w, self.input_scale)
        m = 2**self.depth
        return b, -(-hs // m) * m, -(-ws // m) * m, self.head.layers[0].in_features

    def features(
        self, x_BHWC: jax.Array, *, rngs: nnx.Rngs | None = None, prescaled: bool = False, last_norm: bool = True
    ):
        """The head's input: the last decoder block's output [B, H', W', features] in the compute
        dtype, at the network's size padded up to a multiple of 2**depth (traced callers only).

        last_norm False (depth >= 1): (that block's last conv output before its norm and ReLU, the
        Norm), for a caller that applies them itself (fcn.head_loss)."""
        if not last_norm and not self.depth:
            raise ValueError("UNet.features(last_norm=False) needs depth >= 1")
        _, h, w, c = x_BHWC.shape
        if c != self.in_channels:
            raise ValueError(f"UNet built for in_channels={self.in_channels} got images of {c} channels {x_BHWC.shape}")
        if not jnp.issubdtype(x_BHWC.dtype, jnp.floating):  # uint8 0..255 would be taken as floats in [0, 1]
            raise ValueError(
                f"UNet expects float images in [0, 1], got {x_BHWC.dtype} images {x_BHWC.shape}: divide 0..255 by 255"
            )
        hs, ws = (h, w) if prescaled else scaled_size(h, w, self.input_scale)
        if (hs, ws) != (h, w):
            x_BHWC = resize.linear(x_BHWC.astype(jnp.float32), (hs, ws), antialias=True)
        # Padded as images, before they are centred: padding up front in the same mode (evaluation,
        # fcn.inference, fcn.export) then gives the same input, "constant" (black) included.
        x_BHWC = pad_to_multiple(x_BHWC.astype(jnp.float32), 2**self.depth, self.pad_mode)
        mean, std = (jnp.asarray(v, jnp.float32) for v in input_stats(c))
        x_BHWC = ((x_BHWC - mean) / std).astype(self.dtype)

        skips = []
        for block in self.down:
            x_BHWC = block(x_BHWC)
            skips.append(x_BHWC)
            x_BHWC = max_pool_2x2(x_BHWC)
        x_BHWC = self.bottom(x_BHWC)
        if self.dropout is not None:
            x_BHWC = self.dropout(x_BHWC, rngs=rngs)
        for i, (block, skip) in enumerate(zip(self.up_blocks, reversed(skips))):
            x_BHWC = jnp.concatenate([self._upsample(i, x_BHWC), skip], axis=-1)
            x_BHWC = block(x_BHWC, last_norm=last_norm or i < self.depth - 1)
        return x_BHWC if last_norm else (x_BHWC, self.up_blocks[-1].norms[-1])

    def logits(self, features_BHWC: jax.Array, net_size: tuple[int, int], size: tuple[int, int]) -> jax.Array:
        """The head on `features`' output: float32 logits cropped to the network's size (H', W') and
        resized to the image's (H, W) when they differ."""
        (hs, ws), (h, w) = net_size, size
        logits_BHWK = self.head(features_BHWC).astype(jnp.float32)[:, :hs, :ws]
        if (hs, ws) != (h, w):
            logits_BHWK = resize.linear(logits_BHWK, (h, w))  # jax.image.resize(..., "linear")'s values
        return logits_BHWK


def _check_sizes(*, least: int = 1, **sizes) -> None:
    """Each of `sizes` (UNet's layer sizes, by argument name) an integer >= `least`: else a ValueError naming it."""
    for name, v in sizes.items():
        if not _is_int(v) or v < least:
            raise ValueError(f"model.{name}={v!r}: expected an integer >= {least}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_float_dtype(dtype) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:  # not a dtype at all ('foo')
        return False


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """The size at which the network sees an H x W image under `input_scale`."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def pad_to_multiple(x_BHWC: jax.Array, multiple: int, mode: str = "reflect"):
    """Pad H and W after the last row and column up to a multiple of `multiple`."""
    _, h, w, _ = x_BHWC.shape
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)
    return x_BHWC


@functools.partial(nnx.jit, static_argnums=3)
def _call_jitted(model: UNet, x_BHWC, rngs, prescaled: bool):
    """UNet.__call__ under nnx.jit: called eagerly, the network compiles once per input shape (and
    mode) instead of once per operation and shape: a first call of the default network on a
    37 x 101 image took 5.1 s before, 0.8-1.1 s now (2 CPU cores, benchmarks/notebook_start.py).
    Batch-norm statistics and dropout keys are updated as they are eagerly."""
    return model(x_BHWC, rngs=rngs, prescaled=prescaled)


def predict_proba(model: UNet, x_BHWC: jax.Array) -> jax.Array:
    """Per-pixel class probabilities [B, H, W, K]: softmax of the logits over K (jitted), in
    inference mode (batch norm's running statistics, no dropout) whatever mode `model` is in;
    `model` is left as it was."""
    return _proba_jitted(
        nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False), x_BHWC
    )


@nnx.jit
def _proba_jitted(model: UNet, x_BHWC):
    return jax.nn.softmax(model(x_BHWC), axis=-1)


def from_config(model_config, num_classes: int, *, rngs: nnx.Rngs, **overrides) -> UNet:
    """Build a UNet from a `config.model` ConfigDict."""
    kwargs = dict(
        features=model_config.features,
        depth=model_config.depth,
        norm=model_config.norm,
        upsample=model_config.upsample,
        head=model_config.head,
        bottleneck=model_config.bottleneck,
        dropout=model_config.dropout,
        dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_config.dtype],
        pad_mode=model_config.pad_mode,
        input_scale=model_config.input_scale,
        conv_general_dilated=ops.conv_fn(model_config.conv_impl),
    )
    kwargs.update(overrides)
    return UNet(num_classes, rngs=rngs, **kwargs)
