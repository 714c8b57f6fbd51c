"""Dataset-wide segmentation metrics from one confusion matrix.

Every score here is a function of a single confusion matrix summed over the
whole dataset at the label files' own resolution, never an average of per-batch scores, so the result
cannot depend on batch size or order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# A per-batch count is int32 on device (JAX's default integer width): one
# batch holds far fewer than 2**31 pixels. Running totals live in int64 on the
# host, exact up to 9.2e18 pixels per cell: Cityscapes' 2975 train images hold
# 6.2e9 pixels, so even a million such datasets fit.
_DEVICE_LIMIT = 2**31 - 1


def confusion_matrix(labels_BHW: jax.Array, preds_BHW: jax.Array, num_classes: int, ignore_label: int = 255):
    """[K, K] int32 counts, rows = ground truth, columns = prediction.

    Pixels whose label is `ignore_label` count nowhere (neither as ground truth
    nor as prediction), nor do pixels whose label or prediction is no class id
    (outside 0..K-1): their flat index label * K + prediction would land in
    another pixel's cell. Works on sharded arrays inside jit: XLA sums across
    devices.
    """
    labels_BHW, preds_BHW = labels_BHW.astype(jnp.int32), preds_BHW.astype(jnp.int32)
    in_range = (labels_BHW >= 0) & (labels_BHW < num_classes) & (preds_BHW >= 0) & (preds_BHW < num_classes)
    valid = (labels_BHW != ignore_label) & in_range
    index = jnp.where(valid, labels_BHW * num_classes + preds_BHW, 0)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index.ravel()].add(valid.ravel().astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def host_confusion_matrix(labels_HW: np.ndarray, preds_HW: np.ndarray, num_classes: int, ignore_label: int = 255):
    """`confusion_matrix`'s counts, in numpy on the host ([K, K] int64): for images of sizes of their own."""
    labels, preds = labels_HW.astype(np.int64).ravel(), preds_HW.astype(np.int64).ravel()
    in_range = (labels >= 0) & (labels < num_classes) & (preds >= 0) & (preds < num_classes)
    valid = (labels != ignore_label) & in_range
    counts = np.bincount(labels[valid] * num_classes + preds[valid], minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionAccumulator:
    """Sums per-batch confusion matrices: on device while int32 is safe, then on host in int64.

    `add` does not block: device matrices are summed asynchronously and moved
    to the host only when the pixels added since the last move could exceed
    2**31 - 1, or when `result` is called.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.total = np.zeros((num_classes, num_classes), np.int64)
        self._device = None
        self._pending_pixels = 0

    def add(self, cm_KK: jax.Array, num_pixels: int) -> None:
        """Add a batch's matrix; `num_pixels` bounds its count (e.g. B * H * W)."""
        if self._pending_pixels + num_pixels > _DEVICE_LIMIT:
            self._flush()
        self._device = cm_KK if self._device is None else self._device + cm_KK
        self._pending_pixels += num_pixels

    def _flush(self) -> None:
        if self._device is not None:
            self.total += np.asarray(jax.device_get(self._device), np.int64)
        self._device, self._pending_pixels = None, 0

    def result(self) -> np.ndarray:
        self._flush()
        return self.total.copy()


def scores(cm_KK: np.ndarray) -> dict:
    """Scores from a [K, K] confusion matrix (rows ground truth, columns prediction).

    pixel_accuracy: correct / all valid pixels.
    per-class accuracy (recall): TP / ground-truth pixels of the class; NaN if absent.
    per-class IoU: TP / (TP + FP + FN); NaN for a class absent from both ground
      truth and prediction, which is then left out of mean_iou.
    mean_accuracy, mean_iou: means over the classes with a defined value.
    fw_iou: IoU weighted by each class's share of ground-truth pixels.
    per-class dice (F1): 2 TP / (2 TP + FP + FN).
    """
    cm = np.asarray(cm_KK, np.float64)
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    total = cm.sum()
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
        dice = np.where(union > 0, 2 * tp / (gt + pred), np.nan)
    defined = ~np.isnan(iou)
    return {
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "mean_accuracy": float(np.nanmean(acc)) if (gt > 0).any() else float("nan"),
        "mean_iou": float(np.nanmean(iou)) if defined.any() else float("nan"),
        "fw_iou": float(np.nansum(gt / total * np.nan_to_num(iou))) if total else float("nan"),
        "iou": iou,
        "accuracy": acc,
        "dice": dice,
        "num_pixels": int(total),
    }
