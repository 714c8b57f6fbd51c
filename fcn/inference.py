"""A trained predictor: class maps and probabilities for images of any size.

    seg = fcn.load("runs/camvid_cpu")          # a workdir, or one checkpoint in it
    classes_HW = seg.predict("street.jpg")     # uint8 class ids
    probs_HWK = seg.predict_proba(image_HWC)   # float32 softmax probabilities

Inputs. An image is a file path, a PIL image, or an array [H, W], [H, W, 1],
[H, W, 3] or [H, W, 4] (grayscale is replicated, alpha dropped) of dtype uint8,
of another integer dtype with values in 0..255, or float with values in [0, 1].
Floats are never rescaled: a float image in 0..255 is refused, not guessed. A
list or tuple of images, or an array [B, H, W, C], is a batch; results come back
as a list, or stacked. An empty batch (`[]`, or an array [0, H, W, C]) has nothing to
predict and raises `DataError`, as `fcn.load_exported(...).predict` does; so does anything
else that is not an image, naming it.

Compilations. XLA compiles once per input shape, so each image is placed on a
canvas whose sides are rounded up to a multiple of `bucket` px and a batch is
rounded up to a power of two: 20 random sizes compile a few times, not 20.
The first `exact_sizes` image sizes seen get canvases of their own padded size
instead: a folder of CamVid's 360 x 480 frames runs at 368 x 480, not 384 x 512
(10% fewer pixels; docs/benchmarks.md, the twenty-third session).
The image is padded to the model's own multiple (2**depth) exactly as the model
would pad it, and every convolution zeroes its input outside that region (a mask
through the model's `conv_general_dilated` seam), so the bucketed result equals
the unpadded prediction up to float rounding. Group norm (statistics over the
canvas) and resize upsampling (interpolation across the edge) defeat the mask;
such models use the model's multiple as bucket: exact, one compilation per size.
A model with input_scale < 1 resizes before it pads, so it gets no padding at all.

Tiling. An image with a side over `tile` px is cut into tile x tile tiles that
overlap by `overlap` px, run `batch_size` at a time, so device memory is bounded
by one tile batch whatever the image size; host memory holds the image and the
float32 logits [H, W, K]. Tile origins are multiples of 2**depth, so pooling
windows match the whole-image ones; logits are blended with weights that ramp
linearly across each overlap, hiding tile edges, where a tile lacks context.
A model with input_scale < 1 (given no padding, above) gets its tiles at any
origin instead, the last of a row or column ending at the image's edge, so
their pooling windows need not match the whole image's.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from fcn import canvas
from fcn.data.base import default_palette
from fcn.data.images import DataError

# Reading images: fcn/inputs.py (flax-free: fcn.exported reads them so too); read_input, float_batch,
# resize_channels and shrink, fcn.inference's names before they moved there, are still importable from here.
from fcn.inputs import float_batch, read_batch, read_input, resize_channels, shrink, softmax_inplace, to01  # noqa: F401
from fcn.model import UNet


class Segmenter:
    """A trained model with its classes, palette and input handling.

    Args:
      model: a UNet of 3 input channels (images are read as RGB) and at most 256 classes (class maps
        are uint8; in evaluation mode, or a copy is put in evaluation mode).
      class_names: one name per class (default class_0, class_1, ...).
      palette: uint8 [K, 3] colours (default: the PASCAL-style palette).
      ignore_label: label value that marks unlabelled pixels in this dataset.
      tile: largest canvas side in px (rounded down to a multiple of 2**depth);
        larger images are tiled.
      overlap: px shared by neighbouring tiles (rounded up to a multiple of 2**depth).
      bucket: canvas sides are multiples of this (rounded up to a multiple of 2**depth).
      exact_sizes: the first this many distinct image sizes get canvases of their own
        size (rounded up to 2**depth only); later ones share the bucketed canvases.
      batch_size: images or tiles per compiled call.
      hflip: average the logits with those of the mirrored image.
      max_size: shrink images whose longer side exceeds this, as in training
        (`data.max_size`), and scale the result back up; 0 = predict at full size.
    """

    def __init__(
        self,
        model: UNet,
        class_names: Sequence[str] | None = None,
        palette=None,
        ignore_label: int = 255,
        *,
        tile: int = 512,
        overlap: int = 128,
        bucket: int = 64,
        exact_sizes: int = 4,
        batch_size: int = 4,
        hflip: bool = False,
        max_size: int = 0,
    ):
        k = model.num_classes
        if model.in_channels != 3:  # every input is read as RGB; the model would refuse it at the first call
            raise ValueError(
                f"a model with in_channels={model.in_channels}: a Segmenter feeds it RGB images (3 channels); "
                f"call the model itself on float arrays [B, H, W, {model.in_channels}] in [0, 1]"
            )
        if k > 256:  # class 256 would come back as 0 in a uint8 class map
            raise ValueError(f"a model with {k} classes: class maps are uint8, so a Segmenter takes at most 256")
        class_names = [f"class_{i}" for i in range(k)] if class_names is None else class_names
        self.class_names = tuple(str(n) for n in class_names)
        if len(self.class_names) != k:
            raise ValueError(f"{len(self.class_names)} class names for a model with {k} classes")
        palette = default_palette(k) if palette is None else palette
        try:  # [K, 3], or flat [r, g, b, r, g, b, ...] as PIL's putpalette takes
            palette = np.asarray(palette)
        except ValueError:  # ragged: numpy's words name no palette
            palette = np.asarray(palette, object)
        rows = palette.ndim == 1 and palette.size % 3 == 0 or palette.ndim == 2 and palette.shape[1] == 3
        if not rows or palette.size < 3 * k or not np.isin(palette, np.arange(256)).all():
            raise ValueError(  # else classes past its end drew black, the legend raised an IndexError, RGBA mixed
                f"a palette of shape {palette.shape} for a model with {k} classes: "
                f"give one RGB colour (three integers 0-255) per class, shape ({k}, 3)"
            )
        self.palette = palette.reshape(-1, 3).astype(np.uint8)
        self.ignore_label, self.hflip, self.max_size = ignore_label, hflip, max_size
        self.multiple, self.pad_mode = 2**model.depth, model.pad_mode
        m = self.multiple
        self.tile, self.overlap = canvas.tiles(tile, overlap, m)
        self.exact_buckets = canvas.maskable(model)
        # A model that resizes its input (input_scale < 1) pads after resizing: any padding
        # of ours would change its result, so it gets images and tiles at their own size.
        self._align = m if getattr(model, "input_scale", 1) == 1 else 1
        self.bucket = canvas.ceil_to(max(bucket, 1), m) if self.exact_buckets else self._align
        self.exact_sizes = max(0, exact_sizes)
        self._own_canvases: set[tuple[int, int]] = set()  # the sizes given canvases of their own
        self.batch_size = max(1, batch_size)
        self.model = nnx.merge(*nnx.split(model))  # a copy: the caller's stays as is
        self.model.eval()
        clone = nnx.merge(*nnx.split(self.model))
        if self.exact_buckets:
            for _, module in nnx.iter_graph(clone):
                if isinstance(module, nnx.Conv):
                    module.conv_general_dilated = canvas.masked(module.conv_general_dilated)
        self._graphdef, self._state = nnx.split(clone)
        # The input shape of each trace, hence of each compilation.
        self.traced_shapes: list[tuple[int, ...]] = []
        self._logits_fn = jax.jit(self._traced_logits)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def compilations(self) -> int:
        """How many times the model was traced (and so compiled) so far."""
        return len(self.traced_shapes)

    def predict(self, images, *, hflip: bool | None = None):
        """Class map(s) uint8 [H, W] of an image or batch (see the module docstring)."""
        return self._apply(images, hflip, lambda logits: logits.argmax(axis=-1).astype(np.uint8))

    def predict_proba(self, images, *, hflip: bool | None = None):
        """Softmax probabilities float32 [H, W, K] of an image or batch."""
        return self._apply(images, hflip, softmax_inplace)

    # -- internals -------------------------------------------------------------

    def _traced_logits(self, state, x_BHWC: jax.Array, valid_B2: jax.Array) -> jax.Array:
        self.traced_shapes.append(tuple(x_BHWC.shape))  # Python: runs once per trace
        model = nnx.merge(self._graphdef, state)
        masked = canvas.valid_region(valid_B2, x_BHWC.shape[1:3]) if self.exact_buckets else contextlib.nullcontext()
        with masked:
            return model(x_BHWC)

    def _apply(self, images, hflip: bool | None, finish: Callable[[np.ndarray], np.ndarray]):
        arrays, kind = read_batch(images)
        if not arrays:  # an empty list and an empty array alike (np.stack has no shape to give)
            raise DataError("empty batch of images: nothing to predict")
        hflip = self.hflip if hflip is None else hflip
        results = [finish(logits) for logits in self._logits(arrays, hflip)]
        if kind == "single":
            return results[0]
        return np.stack(results) if kind == "stack" else results

    def _logits(self, images: list[np.ndarray], hflip: bool) -> Iterator[np.ndarray]:
        """float32 logits [H, W, K] per image, in order; small images batched together."""
        sizes = [im.shape[:2] for im in images]
        if self.max_size:
            big = lambda im: max(im.shape[:2]) > self.max_size
            images = [shrink(im, self.max_size) if big(im) else im for im in images]
        small = {i for i, im in enumerate(images) if max(im.shape[:2]) <= self.tile}
        done = self._batched([images[i] for i in sorted(small)], hflip)
        done = dict(zip(sorted(small), done, strict=True))
        for i, image in enumerate(images):
            logits = done.pop(i) if i in small else self._flipped(image, hflip)
            if logits.shape[:2] != sizes[i]:  # shrunk by max_size
                logits = resize_channels(logits, *sizes[i])
            yield logits

    def _flipped(self, image: np.ndarray, hflip: bool) -> np.ndarray:
        logits = self._tiled(image)
        if hflip:
            logits += self._tiled(image[:, ::-1])[:, ::-1]
            logits *= 0.5
        return logits

    def _batched(self, images: list[np.ndarray], hflip: bool) -> list[np.ndarray]:
        """Logits of images within the tile size, grouped by canvas shape."""
        todo = images + ([im[:, ::-1] for im in images] if hflip else [])
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(todo):
            groups.setdefault(self._canvas(*im.shape[:2]), []).append(i)
        out: list = [None] * len(todo)
        for canvas_hw, members in groups.items():
            crops = (todo[i] for i in members)
            for i, logits in zip(members, self._run(crops, canvas_hw), strict=True):
                out[i] = logits
        if hflip:
            n = len(images)
            out = [0.5 * (a + b[:, ::-1]) for a, b in zip(out[:n], out[n:], strict=True)]
        return out

    def _canvas(self, h: int, w: int) -> tuple[int, int]:
        """Canvas (H, W) of an image or of its tiles, at most the tile size: its own padded size
        while `exact_sizes` allows (or when that canvas exists already), else bucketed."""
        own = canvas.size(h, w, self._align, self._align, self.tile)
        bucketed = canvas.size(h, w, self._align, self.bucket, self.tile)
        if own != bucketed and (own in self._own_canvases or len(self._own_canvases) < self.exact_sizes):
            self._own_canvases.add(own)  # a size that is a bucket's takes no place here
            return own
        return bucketed

    def _run(self, crops: Iterable[np.ndarray], canvas_hw: tuple[int, int]) -> Iterator[np.ndarray]:
        """Logits of each crop, `batch_size` crops per call on one canvas shape."""
        crops = iter(crops)
        while chunk := list(itertools.islice(crops, self.batch_size)):
            rows = min(1 << (len(chunk) - 1).bit_length(), self.batch_size)
            x_BHWC = np.zeros((rows, *canvas_hw, 3), np.float32)
            valid_B2 = np.zeros((rows, 2), np.int32)
            for i, crop in enumerate(chunk):
                h, w = crop.shape[:2]
                ph, pw = -h % self._align, -w % self._align
                # Pad to the model's multiple as the model would; the rest is masked.
                pad = ((0, ph), (0, pw), (0, 0))
                x_BHWC[i, : h + ph, : w + pw] = np.pad(to01(crop), pad, self.pad_mode)
                valid_B2[i] = (h + ph, w + pw)
            # np.array, not np.asarray: a writable copy, blended and softmaxed in place.
            logits_BHWK = np.array(self._logits_fn(self._state, x_BHWC, valid_B2))
            for i, crop in enumerate(chunk):
                yield logits_BHWK[i, : crop.shape[0], : crop.shape[1]]

    def _tiled(self, image_HWC: np.ndarray) -> np.ndarray:
        """Logits of a large image from overlapping tiles, blended."""
        run = functools.partial(self._run, canvas_hw=self._canvas(*image_HWC.shape[:2]))
        return canvas.tiled(image_HWC, run, self.tile, self.overlap, self._align, self.num_classes)


def load(path: str | Path, *, which: str = "best", **options) -> Segmenter:
    """A Segmenter from a workdir (its best checkpoint, else the latest) or one checkpoint folder.

    path: a workdir written by train.py, or `{workdir}/checkpoints/N` or `{workdir}/best/N`
    (`fcn.trained.resolve`, as fcn.evaluate, fcn.predict and fcn.export read them).
    which: "best" or "latest", for a workdir. options: Segmenter keyword arguments;
    `hflip` and `max_size` default to the run's `eval_hflip` and `data.max_size`.
    """
    from fcn import state as state_lib, trained

    run = trained.restore(path, which)
    options.setdefault("hflip", bool(run.config.get("eval_hflip", False)))
    options.setdefault("max_size", int(run.config.data.get("max_size", 0)))
    return Segmenter(
        state_lib.eval_model(run.graphs, run.state),
        run.info["class_names"],
        run.info.get("palette"),
        run.info.get("ignore_label", 255),
        **options,
    )
