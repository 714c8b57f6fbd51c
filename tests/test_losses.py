"""Losses against plain numpy references."""

import jax
import numpy as np
import pytest

from fcn import losses


def numpy_ce(logits, labels, ignore, weights=None):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    num = den = 0.0
    for idx in np.ndindex(labels.shape):
        y = labels[idx]
        if y == ignore:
            continue
        w = 1.0 if weights is None else weights[y]
        num += -w * logp[idx][y]
        den += w
    return num / den if den else 0.0


def logits_labels_weights(seed, weighted):
    """Logits [2, 5, 6, 4], labels with about 30% ignored (255), and class weights or None."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 4, size=(2, 5, 6)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.3] = 255
    weights = rng.uniform(0.1, 3, size=4).astype(np.float32) if weighted else None
    return rng, logits, labels, weights


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_numpy(weighted):
    _, logits, labels, weights = logits_labels_weights(0, weighted)
    got = losses.cross_entropy(logits, labels, ignore_label=255, class_weights_K=weights)
    np.testing.assert_allclose(float(got), numpy_ce(logits, labels, 255, weights), rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_gradient_is_softmax_minus_one_hot(weighted):
    # d loss / d logits_i = w_i (softmax_i - onehot_i) / sum w over valid pixels; 0 on ignored ones.
    rng, logits, labels, weights = logits_labels_weights(3, weighted)
    valid = labels != 255
    safe = np.where(valid, labels, 0)
    w = np.where(valid, (np.ones(4, np.float32) if weights is None else weights)[safe], 0.0)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = w[..., None] * (p - np.eye(4)[safe]) / w.sum()

    def loss(x):
        return losses.cross_entropy(x, labels, ignore_label=255, class_weights_K=weights)

    np.testing.assert_allclose(np.asarray(jax.grad(loss)(logits)), want, atol=1e-7)
    # Forward mode too (the rule is a JVP): the derivative along a direction is <gradient, direction>.
    direction = rng.normal(size=logits.shape).astype(np.float32)
    _, along = jax.jvp(loss, (logits,), (direction,))
    np.testing.assert_allclose(float(along), float((want * direction).sum()), rtol=1e-5)


def test_ignored_pixels_add_nothing():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(1, 4, 4))
    labels[0, 0] = 255
    other = logits.copy()
    other[0, 0] = 1e4  # wild logits on ignored pixels change nothing
    a = losses.cross_entropy(logits, labels)
    b = losses.cross_entropy(other, labels)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_labels_that_are_no_class_id_count_as_ignored_in_every_loss():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 4, 5)).astype(np.int32)
    bad = labels.copy()
    bad[0, 0, :2], bad[1, 3, 4] = -1, 3  # no class id of 3 classes: counted nowhere, as fcn.metrics does
    ignored = np.where((bad < 0) | (bad >= 3), 255, bad)
    weights = np.array([0.5, 1.0, 2.0], np.float32)
    for loss in (
        lambda x, y: losses.cross_entropy(x, y),
        lambda x, y: losses.cross_entropy(x, y, class_weights_K=weights),
        lambda x, y: losses.soft_dice(x, y),
    ):
        value, grad = jax.value_and_grad(loss)(logits, bad)
        want, want_grad = jax.value_and_grad(loss)(logits, ignored)
        assert np.isfinite(float(value)) and float(value) == pytest.approx(float(want), rel=1e-6)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), atol=1e-7)


def test_all_ignored_batch_gives_zero_and_zero_gradient():
    logits = np.random.default_rng(2).normal(size=(2, 3, 3, 5)).astype(np.float32)
    labels = np.full((2, 3, 3), 255)
    assert float(losses.cross_entropy(logits, labels)) == 0.0
    assert float(losses.soft_dice(logits, labels)) == pytest.approx(0.0, abs=1e-6)
    grad = jax.grad(lambda x: losses.cross_entropy(x, labels))(logits)
    assert np.isfinite(grad).all() and not grad.any()


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[[[1e30, -1e30, 0.0]]]], np.float32)
    assert np.isfinite(float(losses.cross_entropy(logits, np.array([[[1]]]))))


def test_soft_dice_matches_numpy_and_is_zero_when_perfect():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 4, 5))
    labels[0, 0, :2] = 255
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    valid = (labels != 255)[..., None]
    y = np.eye(3)[np.where(labels == 255, 0, labels)] * valid
    p = p * valid
    dice = (2 * (p * y).sum((0, 1, 2)) + 1) / (p.sum((0, 1, 2)) + y.sum((0, 1, 2)) + 1)
    np.testing.assert_allclose(float(losses.soft_dice(logits, labels)), 1 - dice.mean(), rtol=1e-5)
    perfect = np.eye(3)[labels.clip(0, 2)] * 1e4
    assert float(losses.soft_dice(perfect, labels)) < 1e-3


def test_median_frequency_weights():
    a = np.zeros((4, 4), np.uint8)  # class 0 everywhere
    b = np.zeros((4, 4), np.uint8)
    b[:2] = 1  # class 1 on half of image b
    b[0, 0] = 255
    w = losses.median_frequency_weights([a, b], num_classes=3)
    # class 0: 16 + 8 pixels in images of 16 + 15 valid pixels; class 1: 7 of 15.
    f0, f1 = 24 / 31, 7 / 15
    med = np.median([f0, f1])
    np.testing.assert_allclose(w, [med / f0, med / f1, 0.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_label_frequencies_equal_counting_the_valid_pixels(dtype):
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 5, (7, 9)).astype(dtype) for _ in range(6)]
    for i, label in enumerate(labels):
        label[rng.random(label.shape) < 0.1 * i] = 255  # none in the first image, many in the last
    labels[2][labels[2] == 3] = 0  # a class absent from one image
    counts, image_pixels = losses.label_frequencies(labels, num_classes=5)
    for k in range(5):
        assert counts[k] == sum(int((y == k).sum()) for y in labels)
        assert image_pixels[k] == sum(int((y != 255).sum()) for y in labels if (y == k).any())
