"""Per-pixel losses that respect the ignore label: cross-entropy and soft Dice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy(
    logits_BHWK: jax.Array,
    labels_BHW: jax.Array,
    *,
    ignore_label: int = 255,
    class_weights_K: jax.Array | None = None,
) -> jax.Array:
    """Mean softmax cross-entropy over valid pixels.

    Pixels labelled `ignore_label` add nothing, nor do pixels whose label is no class id
    (outside 0..K-1: a -1 took the last class's logit, a K gave a NaN loss), as in
    `fcn.metrics`. With class weights w, the mean is
    sum_i w[y_i] * ce_i / sum_i w[y_i] over valid pixels (as in PyTorch), so a
    weight scales a class's share of the loss, not the loss's overall size. A
    batch with no valid pixel gives 0, never NaN.
    """
    num_classes = logits_BHWK.shape[-1]
    valid_BHW = valid_pixels(labels_BHW, num_classes, ignore_label)
    safe_BHW = jnp.where(valid_BHW, labels_BHW, 0).astype(jnp.int32)
    nll_BHW = _nll(logits_BHWK.astype(jnp.float32), safe_BHW)
    w_BHW = valid_BHW.astype(jnp.float32)
    if class_weights_K is not None:
        class_weights_K = jnp.asarray(class_weights_K, jnp.float32).reshape(num_classes)
        w_BHW = w_BHW * class_weights_K[safe_BHW]
    return jnp.sum(w_BHW * nll_BHW) / jnp.maximum(jnp.sum(w_BHW), 1e-12)


def valid_pixels(labels_BHW, num_classes: int, ignore_label: int):
    """Pixels with a class id for a label: not `ignore_label`, and in 0..K-1."""
    return (labels_BHW != ignore_label) & (labels_BHW >= 0) & (labels_BHW < num_classes)


def _nll_parts(logits_BHWK, labels_BHW):
    """-log softmax(logits)[label] per pixel, and the log-sum-exp [B, H, W, 1]."""
    lse_BHW1 = jax.nn.logsumexp(logits_BHWK, axis=-1, keepdims=True)  # max-shifted: stable for any logits
    picked_BHW = jnp.take_along_axis(logits_BHWK, labels_BHW[..., None], axis=-1)[..., 0]
    return lse_BHW1[..., 0] - picked_BHW, lse_BHW1


@jax.custom_jvp
def _nll(logits_BHWK, labels_BHW):
    """Per-pixel negative log-likelihood of the labels, with the textbook derivative (softmax - one-hot).

    Derived by jax through log_softmax and take_along_axis, the gradient was a scatter (the
    gather's), a broadcast and several passes. Alone, both forms take about 11 ms on 8 x 176 x
    240 x 11 logits (2-core Xeon, freed memory retained as in training); inside camvid_cpu's
    training step the loss's fusions took 15.2-19.6 ms before, 10.4-12.5 ms with this rule
    (four alternating profiles; docs/benchmarks.md, the fifteenth session). The same values to
    float32 rounding. A JVP rule, not a VJP: jax transposes it for gradients, and forward mode
    still works.
    """
    return _nll_parts(logits_BHWK, labels_BHW)[0]


@_nll.defjvp
def _nll_jvp(primals, tangents):
    logits_BHWK, labels_BHW = primals
    nll_BHW, lse_BHW1 = _nll_parts(logits_BHWK, labels_BHW)
    onehot_BHWK = jnp.arange(logits_BHWK.shape[-1]) == labels_BHW[..., None]
    return nll_BHW, jnp.sum((jnp.exp(logits_BHWK - lse_BHW1) - onehot_BHWK) * tangents[0], axis=-1)


def soft_dice(logits_BHWK: jax.Array, labels_BHW: jax.Array, *, ignore_label: int = 255, eps: float = 1.0):
    """1 - mean over classes of the soft Dice coefficient, over valid pixels only.

    Dice_k = (2 sum p_k y_k + eps) / (sum p_k + sum y_k + eps), summed over the
    whole batch (not per image), with ignored pixels (and labels outside 0..K-1) masked out of p and y.
    """
    num_classes = logits_BHWK.shape[-1]
    valid_BHW = valid_pixels(labels_BHW, num_classes, ignore_label)
    valid_BHW1 = valid_BHW[..., None].astype(jnp.float32)
    probs_BHWK = jax.nn.softmax(logits_BHWK.astype(jnp.float32), axis=-1) * valid_BHW1
    onehot_BHWK = jax.nn.one_hot(jnp.where(valid_BHW, labels_BHW, 0), num_classes) * valid_BHW1
    inter_K = jnp.sum(probs_BHWK * onehot_BHWK, axis=(0, 1, 2))
    total_K = jnp.sum(probs_BHWK, axis=(0, 1, 2)) + jnp.sum(onehot_BHWK, axis=(0, 1, 2))
    return 1.0 - jnp.mean((2 * inter_K + eps) / (total_K + eps))


def label_frequencies(labels, num_classes: int, ignore_label: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Per-class pixel counts, and pixel counts of the images in which each class appears.

    labels: arrays of non-negative class ids; `ignore_label` (>= 0) marks pixels counted nowhere.
    """
    counts = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    # One count of every value, the ignored one's too, rather than a count of a masked copy: 0.15 s
    # against 0.34 s for CamVid train's 367 labels (2-core Xeon), at every start that weights classes.
    for label_HW in labels:
        every = np.bincount(np.ravel(label_HW), minlength=max(num_classes, ignore_label + 1))
        c = every[:num_classes]
        counts += c
        image_pixels += np.where(c > 0, np.size(label_HW) - int(every[ignore_label]), 0)
    return counts, image_pixels


def median_frequency_weights(labels, num_classes: int, ignore_label: int = 255) -> np.ndarray:
    """Median-frequency class balancing (Eigen & Fergus; used by SegNet and FC-DenseNet).

    freq_c = pixels of class c / pixels of the images where c is present, and
    w_c = median(freq) / freq_c. A class absent from the data gets weight 0.
    """
    counts, image_pixels = label_frequencies(labels, num_classes, ignore_label)
    present = counts > 0
    freq = np.where(present, counts / np.maximum(image_pixels, 1), 0.0)
    median = np.median(freq[present]) if present.any() else 1.0
    return np.where(present, median / np.where(present, freq, 1.0), 0.0).astype(np.float32)
