"""Evaluation metrics on examples small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from taskvision.metrics import (
    average_precision,
    best_f1_thresholds,
    classification_metrics,
    current_names,
    regression_metrics,
    tagging_metrics,
)


def one_hot(predicted: list[int], k: int) -> np.ndarray:
    probs = np.full((len(predicted), k), 0.1)
    probs[np.arange(len(predicted)), predicted] = 0.8
    return probs


def test_classification_metrics_on_a_hand_computed_example() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2])
    predicted = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(truth, one_hot(predicted, 3), ["rose", "tulip", "iris"])

    assert m["confusion_matrix"] == {
        "labels": ["rose", "tulip", "iris"],
        "rows": "actual",
        "columns": "predicted",
        "actual_by_predicted": [[1, 1, 0], [0, 2, 0], [1, 0, 1]],
    }
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_label"]["rose"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_label"]["tulip"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert m["per_label"]["iris"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )
    assert m["macro_precision"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert not {"precision", "recall", "f1"} & set(m)  # no figure without saying which average
    assert m["test_images"] == 6


def test_a_label_never_predicted_nor_present_scores_zero_not_nan() -> None:
    m = classification_metrics(np.array([0, 1]), one_hot([0, 1], 3), ["a", "b", "c"])
    assert m["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["accuracy"] == 1.0


def test_average_precision_by_hand() -> None:
    # Ranked: + - + - +  -> precision at the positives: 1/1, 2/3, 3/5.
    truth = np.array([1, 0, 1, 0, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert average_precision(truth, scores) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # The order of the rows does not matter, only the ranking by score.
    order = np.array([4, 2, 0, 3, 1])
    assert average_precision(truth[order], scores[order]) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision(np.array([0, 0]), np.array([0.3, 0.1])) == 0.0
    assert average_precision(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1])) == 1.0


def reference_average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """sklearn's definition written out: the mean, over positives, of precision at each positive's rank."""
    precisions = []
    for i in np.flatnonzero(truth):
        ranked_above = scores >= scores[i]
        precisions.append(truth[ranked_above].sum() / ranked_above.sum())
    return float(np.mean(precisions))


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_the_definition_on_random_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = (rng.random(40) < 0.3).astype(int)
    truth[0] = 1
    scores = rng.permutation(40) / 40.0 + truth * rng.random() * 0.5  # distinct scores
    assert average_precision(truth, scores) == pytest.approx(reference_average_precision(truth, scores))


def test_best_f1_thresholds_separate_the_classes() -> None:
    truth = np.array([[1, 0], [1, 0], [0, 0], [0, 0], [1, 0]])
    scores = np.array([[0.9, 0.2], [0.7, 0.9], [0.4, 0.1], [0.2, 0.3], [0.65, 0.5]])
    thresholds = best_f1_thresholds(truth, scores)
    # Between the lowest positive (0.65) and the highest negative (0.4).
    assert 0.4 < thresholds[0] <= 0.65
    assert ((scores[:, 0] >= thresholds[0]) == truth[:, 0].astype(bool)).all()
    # No positive example: the default threshold.
    assert thresholds[1] == 0.5
    assert best_f1_thresholds(truth, scores, default=0.3)[1] == 0.3


def test_best_f1_threshold_when_classes_overlap() -> None:
    # Scores 0.9+, 0.8-, 0.7+, 0.6+, 0.1-: the best F1 (6/7) keeps the top four.
    truth = np.array([[1], [0], [1], [1], [0]])
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.1]])
    (threshold,) = best_f1_thresholds(truth, scores)
    assert 0.1 < threshold <= 0.6


def test_tagging_metrics_by_hand() -> None:
    truth = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    probs = np.array([[0.8, 0.2], [0.3, 0.9], [0.6, 0.7], [0.1, 0.1]])
    m = tagging_metrics(truth, probs, ["red", "striped"], [0.5, 0.5])
    # red: predicted rows 0, 2 (tp 1, fp 1, fn 1); striped: predicted rows 1, 2 (perfect).
    assert m["per_label"]["red"]["precision"] == pytest.approx(0.5)
    assert m["per_label"]["red"]["recall"] == pytest.approx(0.5)
    assert m["per_label"]["striped"]["f1"] == pytest.approx(1.0)
    assert m["per_label"]["red"]["average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert m["exact_match_accuracy"] == pytest.approx(2 / 4)  # every tag right: rows 0 and 3 only
    assert "accuracy" not in m
    assert m["per_label"]["red"]["support"] == 2
    # Pooled over the 8 (image, tag) decisions: tp 3 (red 1, striped 2), fp 1, fn 1.
    assert m["micro_precision"] == pytest.approx(3 / 4)
    assert m["micro_recall"] == pytest.approx(3 / 4)
    assert m["micro_f1"] == pytest.approx(3 / 4)
    assert m["macro_f1"] == pytest.approx((0.5 + 1.0) / 2)


def test_metrics_recorded_under_the_old_names_read_under_todays() -> None:
    old_class = {
        "accuracy": 0.8,
        "precision": 0.7,
        "recall": 0.6,
        "f1": 0.65,
        "confusion_matrix": {"labels": ["a", "b"], "matrix": [[2, 1], [0, 2]]},
    }
    new = current_names("multi_class", old_class)
    assert new["accuracy"] == 0.8 and new["macro_precision"] == 0.7 and new["macro_f1"] == 0.65
    assert new["confusion_matrix"] == {
        "labels": ["a", "b"],
        "rows": "actual",
        "columns": "predicted",
        "actual_by_predicted": [[2, 1], [0, 2]],
    }
    tags = current_names("multi_label", {"mAP": 0.9, "accuracy": 0.5, "f1": 0.8})
    assert tags == {"mAP": 0.9, "exact_match_accuracy": 0.5, "macro_f1": 0.8}
    # Today's names pass through unchanged.
    today = classification_metrics(np.array([0, 1]), one_hot([0, 1], 2), ["a", "b"])
    assert current_names("multi_class", today) == today


def test_regression_metrics_by_hand() -> None:
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    predicted = np.array([1.5, 2.0, 2.5, 5.0])
    m = regression_metrics(truth, predicted, ["size"])
    assert m["mae"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(np.sqrt(0.375))
    assert m["r2"] == pytest.approx(1 - 1.5 / 5.0)
    assert m["per_label"]["size"]["mae"] == pytest.approx(0.5)
    assert m["test_images"] == 4
    assert regression_metrics(truth, truth.copy(), ["size"])["r2"] == 1.0


def test_expected_calibration_error_by_hand() -> None:
    from taskvision.metrics import expected_calibration_error

    # Bin [0.9, 1.0): 4 answers at 0.95, 3 right (0.75): |0.75 - 0.95| = 0.2 for 4 of 6 rows.
    # Bin [0.6, 0.7): 2 answers at 0.65, 1 right (0.5): 0.15 for 2 of 6 rows.
    correct = np.array([1, 1, 1, 0, 1, 0])
    confidence = np.array([0.95, 0.95, 0.95, 0.95, 0.65, 0.65])
    assert expected_calibration_error(correct, confidence) == pytest.approx((4 * 0.2 + 2 * 0.15) / 6)
    assert expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0  # right and sure
    assert expected_calibration_error(np.array([]), np.array([])) == 0.0


def test_classification_and_tagging_metrics_report_calibration() -> None:
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.3, 0.7], [0.3, 0.7]])
    metrics = classification_metrics(np.array([0, 1, 1, 1]), probs, ["a", "b"])
    assert metrics["ece"] == pytest.approx((2 * abs(0.5 - 0.95) + 2 * abs(1.0 - 0.7)) / 4)
    tags = tagging_metrics(np.array([[1], [0]]), np.array([[0.8], [0.8]]), ["t"], [0.5])
    assert tags["per_label"]["t"]["ece"] == pytest.approx(abs(0.5 - 0.8)) == tags["ece"]
