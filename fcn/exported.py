"""Reloading a folder written by `python -m fcn.export`: `load_exported(dir)`, with jax and numpy only
(no model code), giving class names and the predictor's `predict` / `predict_proba` for the artifact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np

ARTIFACT, METADATA, SAVED_MODEL, TFLITE = "model.jax", "model.json", "saved_model", "model.tflite"

__all__ = ["ARTIFACT", "METADATA", "SAVED_MODEL", "TFLITE", "ExportedModel", "load_exported"]


class ExportedModel:
    """An exported artifact with its class names: needs jax and numpy, not the model code."""

    def __init__(self, path: str | Path):
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

    def logits(self, images) -> np.ndarray:
        """float32 logits [B, H, W, K] (or [H, W, K]) of a batch of images of one size (or one image),
        read as `fcn.load(...).predict` reads them: paths, PIL images, or arrays of uint8, integers in
        0..255 or floats in [0, 1]; anything else raises ValueError (DataError) naming it. Images whose
        longer side exceeds the training's `data.max_size` are shrunk to it and the logits scaled back,
        as the predictor does. An image is run whole: the predictor cuts one over its `tile` size (512 px)
        into tiles, whose logits differ a little near tile edges."""
        from fcn.inference import float_batch, resize_channels

        x_BHWC, single, (h, w) = float_batch(images, self.max_size)
        if self.size is not None and tuple(x_BHWC.shape[1:3]) != self.size:
            eh, ew = self.size
            shrunk = f" (shrunk to {x_BHWC.shape[1]}x{x_BHWC.shape[2]}: data.max_size={self.max_size})"
            raise ValueError(  # shrunk: either side may have kept its length (1 x 300 -> 1 x 20)
                f"images of size {h}x{w}{shrunk if x_BHWC.shape[1:3] != (h, w) else ''}: this model was exported for "
                f"{eh}x{ew} images only (python -m fcn.export --size {eh},{ew}); resize them, or export again "
                "with --size"
            )
        try:
            out = np.asarray(self.exported.call(x_BHWC))
        except ValueError as e:  # jax.export's refusal of another platform's artifact does not name the file
            if "exported for platforms" not in str(e):
                raise
            from jax import export

            both = ",".join(dict.fromkeys([*self.exported.platforms, export.default_export_platform()]))
            raise ValueError(
                f"{self.path / ARTIFACT}: {e} Export it again on this machine, or with --platforms naming this "
                f"machine's platform too (python -m fcn.export --platforms {both})"
            ) from None
        if out.shape[1:3] != (h, w):
            out = np.stack([resize_channels(logits_HWK, h, w) for logits_HWK in out])
        return out[0] if single else out

    def predict(self, images) -> np.ndarray:
        """uint8 class map(s) [(B,) H, W]."""
        return self.logits(images).argmax(axis=-1).astype(np.uint8)

    def predict_proba(self, images) -> np.ndarray:
        """float32 softmax probabilities [(B,) H, W, K]."""
        return np.asarray(jax.nn.softmax(self.logits(images), axis=-1))


def load_exported(path: str | Path) -> ExportedModel:
    """Reload a folder written by `python -m fcn.export`."""
    return ExportedModel(path)
