"""Dice / IoU against hand-computed masks and scikit-learn."""

import numpy as np
import pytest

from amvlm_jax import metrics


def test_hand_computed_binary():
    truth = np.zeros((1, 4, 4), np.int32)
    truth[0, :2, :2] = 1  # 4 pixels
    predicted = np.zeros((1, 4, 4), np.int32)
    predicted[0, :2, :3] = 1  # 6 pixels, 4 overlap
    dice, iou = metrics.dice_iou_per_image(predicted, truth, num_classes=1)
    assert float(dice[0]) == pytest.approx(2 * 4 / (4 + 6))
    assert float(iou[0]) == pytest.approx(4 / 6)


def test_empty_prediction_and_truth_score_one_and_miss_scores_zero():
    empty = np.zeros((2, 4, 4), np.int32)
    miss = empty.copy()
    miss[1, 0, 0] = 1
    dice, iou = metrics.dice_iou_per_image(empty, miss, num_classes=1)
    np.testing.assert_allclose(np.asarray(dice), [1.0, 0.0])
    np.testing.assert_allclose(np.asarray(iou), [1.0, 0.0])


def test_a_class_predicted_where_the_truth_has_none_scores_zero():
    # Binary: an empty truth with 2 predicted pixels is a miss (2|P & Y| / (|P| + |Y|) = 0), not an empty image.
    truth = np.zeros((1, 4, 4), np.int32)
    predicted = truth.copy()
    predicted[0, 0, :2] = 1
    dice, iou = metrics.dice_iou_per_image(predicted, truth, num_classes=1)
    np.testing.assert_allclose(np.asarray(dice), [0.0])
    np.testing.assert_allclose(np.asarray(iou), [0.0])
    # Multi-class: class 1 found exactly, class 2 predicted but absent from the truth: (1 + 0) / 2.
    truth = np.array([[[1, 1, 0, 0]]])
    predicted = np.array([[[1, 1, 2, 0]]])
    dice, iou = metrics.dice_iou_per_image(predicted, truth, num_classes=4)
    np.testing.assert_allclose(np.asarray(dice), [0.5])
    np.testing.assert_allclose(np.asarray(iou), [0.5])
    _, _, present = metrics.dice_iou_per_class(predicted, truth, num_classes=4)
    np.testing.assert_array_equal(np.asarray(present), [[True, True, False]])


def test_multiclass_averages_the_classes_in_prediction_or_truth():
    truth = np.array([[[1, 1, 2, 0]], [[3, 0, 0, 0]], [[0, 0, 0, 0]]])
    predicted = np.array([[[1, 2, 2, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]]])
    dice, iou = metrics.dice_iou_per_image(predicted, truth, num_classes=4)
    # Image 0: class 1 |P|=1 |Y|=2 inter 1 -> 2/3, IoU 1/2; class 2 |P|=2 |Y|=1 -> 2/3, 1/2; class 3 in neither:
    # left out (scored 1 it would lift the mean to 7/9). Image 1: only class 3, missed -> 0, not (1 + 1 + 0) / 3.
    # Image 2: no class anywhere -> 1 (SPEC 7's empty image).
    np.testing.assert_allclose(np.asarray(dice), [2 / 3, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(iou), [0.5, 0.0, 1.0], rtol=1e-6)
    per_class, per_class_iou, present = metrics.dice_iou_per_class(predicted, truth, num_classes=4)
    np.testing.assert_array_equal(np.asarray(present), [[True, True, False], [False, False, True], [False] * 3])
    # A class in neither P nor Y scores 1 (the docstring's value), whatever the averages then leave out.
    np.testing.assert_allclose(np.asarray(per_class)[~np.asarray(present)], 1.0)
    np.testing.assert_allclose(np.asarray(per_class_iou)[~np.asarray(present)], 1.0)
    summary = metrics.class_summary(np.asarray(per_class), np.asarray(per_class_iou), np.asarray(present))
    assert summary == {"1": {"dice": pytest.approx(200 / 3), "miou": pytest.approx(50.0), "images": 1},
                       "2": {"dice": pytest.approx(200 / 3), "miou": pytest.approx(50.0), "images": 1},
                       "3": {"dice": 0.0, "miou": 0.0, "images": 1}}


def test_predict_labels_thresholds_and_argmax():
    logits = np.array([[[[-0.1], [0.2]]]], np.float32)
    np.testing.assert_array_equal(np.asarray(metrics.predict_labels(logits)), [[[0, 1]]])
    logits = np.array([[[[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]]]], np.float32)
    np.testing.assert_array_equal(np.asarray(metrics.predict_labels(logits)), [[[1, 0]]])
    # A logit of exactly 0 (probability 0.5) is background, as predict's 0.5 threshold has it; a tie between
    # classes goes to the lower id, as numpy's argmax.
    np.testing.assert_array_equal(np.asarray(metrics.predict_labels(np.zeros((1, 1, 2, 1), np.float32))), [[[0, 0]]])
    tied = np.array([[[[0.0, 1.0, 1.0], [2.0, 2.0, 0.0]]]], np.float32)
    np.testing.assert_array_equal(np.asarray(metrics.predict_labels(tied)), np.argmax(tied, axis=-1))


@pytest.mark.parametrize("num_classes", [1, 4])
def test_against_sklearn_on_random_masks(num_classes):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = max(num_classes, 2)
    truth = rng.integers(0, labels, size=(6, 16, 16))
    predicted = np.where(rng.random((6, 16, 16)) < 0.7, truth, rng.integers(0, labels, size=(6, 16, 16)))
    predicted[0] = 0  # One image with an empty prediction.
    truth[1][truth[1] == labels - 1] = 0  # One image without the last class in the prediction or the truth.
    predicted[1][predicted[1] == labels - 1] = 0
    dice, iou = metrics.dice_iou_per_image(predicted, truth, num_classes)
    foreground = list(range(1, labels))
    for b in range(6):
        # The classes in the image's prediction or truth (an image with none scores 1, as zero_division gives).
        labels_present = [c for c in foreground if (truth[b] == c).any() or (predicted[b] == c).any()] or foreground
        kwargs = dict(labels=labels_present, average="macro", zero_division=1.0)
        if num_classes == 1:
            kwargs = dict(zero_division=1.0)
        expected_dice = sklearn_metrics.f1_score(truth[b].ravel(), predicted[b].ravel(), **kwargs)
        expected_iou = sklearn_metrics.jaccard_score(truth[b].ravel(), predicted[b].ravel(), **kwargs)
        assert float(dice[b]) == pytest.approx(expected_dice, abs=1e-6)
        assert float(iou[b]) == pytest.approx(expected_iou, abs=1e-6)


def test_summarize_reports_percent():
    summary = metrics.summarize(np.array([0.5, 1.0]), np.array([0.25, 0.75]))
    assert summary == {"dice": 75.0, "miou": 50.0, "images": 2}
    # An image scoring 0 counts among the images and in the means.
    summary = metrics.summarize(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.25, 1.0]))
    assert summary == {"dice": 50.0, "miou": pytest.approx(125 / 3), "images": 3}


def _logit_bin_centres(index, bins):
    low, high = metrics.HISTOGRAM_LOGIT_MIN, metrics.HISTOGRAM_LOGIT_MAX
    return 1.0 / (1.0 + np.exp(-(low + (index + 0.5) / bins * (high - low))))


def test_pixel_auroc_from_histograms_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    bins = 50
    truth = rng.random((3, 8, 8)) < 0.3
    # Scores on bin centres, higher on positives, with ties inside bins.
    index = np.clip(np.floor((0.35 * truth + rng.random((3, 8, 8)) * 0.65) * bins), 0, bins - 1)
    scores = _logit_bin_centres(index, bins)
    valid = np.array([True, True, False])  # The padding row counts nowhere.
    positive, negative = metrics.foreground_histograms(scores, truth, valid, bins)
    assert float(np.sum(positive) + np.sum(negative)) == 2 * 64
    expected = sklearn_metrics.roc_auc_score(truth[:2].ravel(), scores[:2].ravel())
    assert metrics.auroc_from_histograms(positive, negative) == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_from_histograms_ranks_confident_maps():
    # A confident map: negatives at 1e-20, three positives at 1e-5 and a missed one at 1e-30. Equal bins
    # over [0, 1] would tie all three levels (AUROC 0.5); the logit bins rank them (0.75).
    truth = np.zeros((1, 4, 4), bool)
    truth[0, 0, :4] = True
    scores = np.full((1, 4, 4), 1e-20, np.float32)
    scores[0, 0, :3], scores[0, 0, 3] = 1e-5, 1e-30
    positive, negative = metrics.foreground_histograms(scores, truth, np.array([True]), 4096)
    assert metrics.auroc_from_histograms(positive, negative) == pytest.approx(0.75)
    # Saturated float32 probabilities (0 and 1) still count, in the end bins.
    positive, negative = metrics.foreground_histograms(np.array([[[1.0, 0.0]]]), np.array([[[True, False]]]),
                                                       np.array([True]), 4096)
    assert (float(positive[-1]), float(negative[0])) == (1.0, 1.0)
    assert float(np.sum(positive[:-1]) + np.sum(negative[1:])) == 0.0


def test_pixel_auroc_hand_cases():
    assert metrics.auroc_from_histograms([0, 0, 2], [3, 0, 0]) == 1.0  # perfect separation
    assert metrics.auroc_from_histograms([1, 0], [1, 0]) == 0.5  # all tied
    assert metrics.auroc_from_histograms([2, 0], [0, 2]) == 0.0  # inverted
    assert np.isnan(metrics.auroc_from_histograms([0, 0], [1, 1]))  # no positives


def test_linear_probe_penalty_shrinks_the_weights_to_the_training_prior():
    """A penalty far above what any weight saves leaves only the biases: every row is given the most frequent
    training class (a, 6 of 8), so held-out rows 2 a + 2 b score 1/2; with a small penalty the separable
    feature gives all 4."""
    x = np.array([[-3.0], [-2.5], [-2.0], [-1.5], [-1.0], [-0.5], [2.0], [3.0]])
    labels = ["a"] * 6 + ["b"] * 2
    held_out = (np.array([[-2.0], [-1.0], [2.5], [3.5]]), ["a", "a", "b", "b"])
    heavy = metrics.linear_probe_accuracy(x, labels, {"test": held_out}, steps=20, l2=1e4)["test"]
    light = metrics.linear_probe_accuracy(x, labels, {"test": held_out}, steps=20, l2=1e-3)["test"]
    assert heavy == {"accuracy": 0.5, "majority": 0.5, "rows": 4}
    assert light == {"accuracy": 1.0, "majority": 0.5, "rows": 4}
