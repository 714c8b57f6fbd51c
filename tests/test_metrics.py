"""Dataset-wide metrics against a plain numpy reference; batch size and order cannot matter."""

import jax.numpy as jnp
import numpy as np
import pytest

from fcn import metrics


def numpy_confusion(labels, preds, k, ignore=255):
    cm = np.zeros((k, k), np.int64)
    for y, p in zip(labels.ravel(), preds.ravel()):
        if y != ignore:
            cm[y, p] += 1
    return cm


def numpy_scores(cm):
    k = len(cm)
    ious, accs, dices = [], [], []
    for c in range(k):
        tp = cm[c, c]
        fp = cm[:, c].sum() - tp
        fn = cm[c, :].sum() - tp
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        dices.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan)
        accs.append(tp / cm[c].sum() if cm[c].sum() else np.nan)
    freq = cm.sum(1) / cm.sum()
    return {
        "pixel_accuracy": np.trace(cm) / cm.sum(),
        "mean_iou": np.nanmean(ious),
        "mean_accuracy": np.nanmean(accs),
        "fw_iou": sum(f * i for f, i in zip(freq, ious) if not np.isnan(i)),
        "iou": np.array(ious),
        "dice": np.array(dices),
    }


def random_dataset(seed, n=7, k=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k - 1, size=(n, 9, 11)).astype(np.uint8)  # class k-1 never in ground truth
    preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, k - 1, size=labels.shape)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.2] = 255
    labels[3] = 255  # an all-ignored image
    preds[labels == 2] = 3  # class 2 never predicted correctly: IoU 0
    return labels, preds


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_numpy(seed):
    labels, preds = random_dataset(seed)
    k = 5
    cm = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), k))
    ref_cm = numpy_confusion(labels, preds, k)
    np.testing.assert_array_equal(cm, ref_cm)
    got, ref = metrics.scores(cm), numpy_scores(ref_cm)
    for key in ("pixel_accuracy", "mean_iou", "mean_accuracy", "fw_iou"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key
    np.testing.assert_array_equal(np.isnan(got["iou"]), np.isnan(ref["iou"]))
    np.testing.assert_allclose(got["dice"], ref["dice"], rtol=1e-12)  # the report's per-class dice column
    assert np.isnan(got["iou"][4])  # absent from ground truth and prediction: left out of the mean
    assert got["iou"][2] == 0.0


def test_identical_for_any_batch_size_and_order():
    labels, preds = random_dataset(5, n=12)
    results = []
    for batch, order in [(1, None), (5, None), (12, None), (7, np.random.default_rng(0).permutation(12))]:
        idx = np.arange(12) if order is None else order
        acc = metrics.ConfusionAccumulator(5)
        for s in range(0, 12, batch):  # uneven last batch included
            i = idx[s : s + batch]
            acc.add(metrics.confusion_matrix(jnp.asarray(labels[i]), jnp.asarray(preds[i]), 5), labels[i].size)
        results.append(acc.result())
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    assert results[0].dtype == np.int64


def test_accumulator_moves_to_host_before_int32_could_overflow():
    acc = metrics.ConfusionAccumulator(2)
    one = jnp.array([[1, 0], [0, 0]], jnp.int32)
    acc.add(one, 2**30)
    acc.add(one, 2**30)  # would pass 2**31 - 1 pixels on device: flushed first
    assert acc._pending_pixels == 2**30
    assert acc.result()[0, 0] == 2


def test_ignored_pixels_count_nowhere():
    labels = jnp.array([[[0, 255], [1, 255]]])
    preds = jnp.array([[[0, 1], [1, 0]]])
    cm = np.asarray(metrics.confusion_matrix(labels, preds, 2))
    np.testing.assert_array_equal(cm, [[1, 0], [0, 1]])


@pytest.mark.parametrize("host", [False, True], ids=["device", "host"])
def test_labels_and_predictions_that_are_no_class_id_count_nowhere(host):
    """fcn.metrics is public: a label or prediction outside 0..K-1 (here -1 and K) counted in another
    pixel's cell (label * K + prediction: a label -1 with prediction 1 as class K-1's ground truth).
    The host matrix (evaluate's full-size path) must agree: there a prediction K would land in the
    next row's column 0, and an ignored pixel (255) must count nowhere either."""
    labels = np.array([[[0, -1, 2, 3, 1, 1, 0, 255]]], np.int32)
    preds = np.array([[[0, 1, 2, 0, 3, -1, 3, 1]]], np.int32)
    if host:
        cm = metrics.host_confusion_matrix(labels[0], preds[0], 3)
    else:
        cm = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 3))
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 0], [0, 0, 1]])


def test_empty_matrix_gives_nan_not_errors():
    s = metrics.scores(np.zeros((3, 3), np.int64))
    assert np.isnan(s["mean_iou"]) and np.isnan(s["pixel_accuracy"])


def test_an_undefined_metric_is_shown_as_a_dash_not_as_zero():
    from fcn.evaluate import format_report, headline

    rep = {"mean_iou": None, "pixel_accuracy": 0.5, "mean_accuracy": None, "fw_iou": None, "per_class": []}
    assert headline(rep) == "mean IoU    -, pixel accuracy 50.00"  # was "mean IoU 0.00": a score no class had
    assert format_report(rep).splitlines()[-1].startswith("mean IoU     -   pixel acc  50.0")


def test_a_class_predicted_but_absent_from_the_ground_truth_scores_iou_0_and_no_accuracy():
    """As the README says: its IoU 0 counts in the mean IoU; its accuracy is undefined, left out of the mean."""
    cm = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]])  # class 2 predicted twice, never in the ground truth
    s = metrics.scores(cm)
    assert s["iou"][2] == 0.0 and np.isnan(s["accuracy"][2])
    assert s["mean_iou"] == pytest.approx((3 / 4 + 2 / 5 + 0) / 3)
    assert s["mean_accuracy"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert s["fw_iou"] == pytest.approx(4 / 8 * 3 / 4 + 4 / 8 * 2 / 5) and s["pixel_accuracy"] == 5 / 8
