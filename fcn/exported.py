"""Reloading a folder written by `python -m fcn.export`: `load_exported(dir)`, with jax and numpy only
(no model code), giving class names and the predictor's `predict` / `predict_proba` for the artifact.

Tiling. An image with a side over `tile` px (512) is run as fcn.load's predictor runs it: in tiles
that overlap by `overlap` px (128), at origins that are multiples of 2**depth, blended by
fcn.canvas (the predictor's code), so activations are bounded by one tile's whatever the image size
(a 2000 x 2000 image: 2.8 GB peak RSS whole, against 0.9 GB tiled, for a width-32 depth-4 model).
Smaller images run whole, their logits model.jax's own. An artifact exported for one size
(--size) runs at that size only, whole; one exported before model.json held "multiple" (2**depth)
runs whole too: export it again to have large images tiled."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np

from fcn import canvas

ARTIFACT, METADATA, SAVED_MODEL, TFLITE = "model.jax", "model.json", "saved_model", "model.tflite"

__all__ = ["ARTIFACT", "METADATA", "SAVED_MODEL", "TFLITE", "ExportedModel", "load_exported"]


class ExportedModel:
    """An exported artifact with its class names: needs jax and numpy, not the model code."""

    def __init__(self, path: str | Path, *, tile: int = 512, overlap: int = 128):
        """tile, overlap: as fcn.load's predictor takes them (px; rounded to multiples of 2**depth)."""
        from jax import export

        path = self.path = Path(path)
        for name in (ARTIFACT, METADATA):  # model.json is the last file an export puts in place
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"{path / name} not found: is {path} a folder written by `python -m fcn.export`, "
                    "and did that export finish?"
                )
        again = "; export it again with `python -m fcn.export`"
        try:
            meta = json.loads((path / METADATA).read_text())
            self.class_names = tuple(meta["class_names"])
            self.palette = np.asarray(meta["palette"], np.uint8).reshape(-1, 3)
            self.ignore_label = meta["ignore_label"]
            self.size = tuple(meta["size"]) if meta.get("size") else None  # (H, W) when exported for one size
            self.max_size = int(meta.get("max_size", 0))  # data.max_size in training: larger images are shrunk
            self.multiple = int(meta.get("multiple", 0))  # 2**depth; 0: an export from before tiling
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path / METADATA} is damaged or not fcn's ({type(e).__name__}: {e}){again}") from e
        artifact = (path / ARTIFACT).read_bytes()
        digest = hashlib.sha256(artifact).hexdigest()
        if meta.get("sha256", digest) != digest:  # exports before the checksum have none
            raise ValueError(f"{path / ARTIFACT} does not match the SHA-256 in {METADATA}: damaged or replaced{again}")
        try:
            self.exported = export.deserialize(bytearray(artifact))
        except Exception as e:
            raise ValueError(f"{path / ARTIFACT} cannot be read by jax.export ({type(e).__name__}: {e}){again}") from e
        # Tiles for an artifact of any size whose 2**depth is known; one of one size runs at it, whole.
        self.tiles = canvas.tiles(tile, overlap, self.multiple) if self.multiple and self.size is None else None

    def logits(self, images) -> np.ndarray:
        """float32 logits [B, H, W, K] (or [H, W, K]) of a batch of images of one size (or one image),
        read as `fcn.load(...).predict` reads them: paths, PIL images, or arrays of uint8, integers in
        0..255 or floats in [0, 1]; anything else raises ValueError (DataError) naming it. Images whose
        longer side exceeds the training's `data.max_size` are shrunk to it and the logits scaled back,
        as the predictor does. An image with a side over `tile` (after that) is run in tiles blended as
        the predictor blends them (module docstring); a smaller one whole, as model.jax gives it."""
        from fcn.inputs import float_batch, resize_channels

        x_BHWC, single, (h, w) = float_batch(images, self.max_size)
        if self.size is not None and tuple(x_BHWC.shape[1:3]) != self.size:
            eh, ew = self.size
            shrunk = f" (shrunk to {x_BHWC.shape[1]}x{x_BHWC.shape[2]}: data.max_size={self.max_size})"
            raise ValueError(  # shrunk: either side may have kept its length (1 x 300 -> 1 x 20)
                f"images of size {h}x{w}{shrunk if x_BHWC.shape[1:3] != (h, w) else ''}: this model was exported for "
                f"{eh}x{ew} images only (python -m fcn.export --size {eh},{ew}); resize them, or export again "
                "with --size"
            )
        if self.tiles and max(x_BHWC.shape[1:3]) > self.tiles[0]:
            k = len(self.class_names)
            out = np.stack([canvas.tiled(x_HWC, self._run, *self.tiles, self.multiple, k) for x_HWC in x_BHWC])
        else:
            out = self._call(x_BHWC)
        if out.shape[1:3] != (h, w):
            out = np.stack([resize_channels(logits_HWK, h, w) for logits_HWK in out])
        return out[0] if single else out

    def _run(self, crops):
        """Logits [h, w, K] of each crop [h, w, 3] (canvas.tiled's tiles), one call each."""
        return (self._call(crop_HWC[None])[0] for crop_HWC in crops)

    def _call(self, x_BHWC: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self.exported.call(x_BHWC))
        except ValueError as e:  # jax.export's refusal of another platform's artifact does not name the file
            if "exported for platforms" not in str(e):
                raise
            from jax import export

            both = ",".join(dict.fromkeys([*self.exported.platforms, export.default_export_platform()]))
            raise ValueError(
                f"{self.path / ARTIFACT}: {e} Export it again on this machine, or with --platforms naming this "
                f"machine's platform too (python -m fcn.export --platforms {both})"
            ) from None

    def predict(self, images) -> np.ndarray:
        """uint8 class map(s) [(B,) H, W]."""
        return self.logits(images).argmax(axis=-1).astype(np.uint8)

    def predict_proba(self, images) -> np.ndarray:
        """float32 softmax probabilities [(B,) H, W, K]."""
        return np.asarray(jax.nn.softmax(self.logits(images), axis=-1))


def load_exported(path: str | Path, **options) -> ExportedModel:
    """Reload a folder written by `python -m fcn.export`; options: `tile`, `overlap` (ExportedModel)."""
    return ExportedModel(path, **options)
