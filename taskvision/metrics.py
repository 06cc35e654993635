"""Evaluation metrics for the three task types (numpy only, so any unit can use them).

Every figure is named as what it is: ``macro_*`` are unweighted means over the
labels (each label counts the same, however many images it has), ``micro_*``
pool every (image, tag) decision (multi_label), ``exact_match_accuracy`` is the
share of images whose whole tag set was right. The confusion matrix names its
axes: ``actual_by_predicted[i][j]`` counts test images of actual label
``labels[i]`` predicted as ``labels[j]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating[Any]]
IntArray = npt.NDArray[np.integer[Any]]


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def _prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def expected_calibration_error(
    correct: FloatArray | IntArray, confidence: FloatArray, *, bins: int = 10
) -> float:
    """How far stated confidence is from the observed frequency: the mean over ``bins`` equal-width
    confidence bins of |frequency - mean confidence|, weighted by the bin's share of the rows.

    ``correct`` is 1/0 per row (the prediction was right, or the tag is present), ``confidence``
    the probability the model gave it. 0 is perfectly calibrated.
    """
    correct, confidence = np.asarray(correct, dtype=float), np.asarray(confidence, dtype=float)
    if len(correct) == 0:
        return 0.0
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / len(correct))


def classification_metrics(y_true: IntArray, probs: FloatArray, label_names: list[str]) -> dict[str, Any]:
    """multi_class: accuracy, per-label and macro precision/recall/F1, confusion matrix (rows = truth),
    expected calibration error of the top label's probability."""
    n = len(label_names)
    y_pred = probs.argmax(axis=1)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    per_label = {}
    for i, name in enumerate(label_names):
        tp = confusion[i, i]
        per_label[name] = {
            **_prf(tp, confusion[:, i].sum() - tp, confusion[i, :].sum() - tp),
            "support": int(confusion[i, :].sum()),
        }
    return {
        "accuracy": _safe_div(float(np.trace(confusion)), float(confusion.sum())),
        **_macro(per_label),
        "ece": expected_calibration_error((y_pred == y_true).astype(float), probs.max(axis=1)),
        "per_label": per_label,
        "confusion_matrix": confusion_matrix(label_names, confusion.tolist()),
        "test_images": len(y_true),
    }


def _macro(per_label: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {
        f"macro_{k}": float(np.mean([m[k] for m in per_label.values()])) if per_label else 0.0
        for k in ("precision", "recall", "f1")
    }


def confusion_matrix(labels: list[str], actual_by_predicted: list[list[int]]) -> dict[str, Any]:
    """The confusion matrix with its axes named: rows are the actual labels, columns the predicted."""
    return {
        "labels": labels,
        "rows": "actual",
        "columns": "predicted",
        "actual_by_predicted": actual_by_predicted,
    }


def average_precision(y_true: IntArray, scores: FloatArray) -> float:
    """Area under the precision-recall curve, as the mean of precision at each positive (sklearn's AP)."""
    positives = int(y_true.sum())
    if positives == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    hits = y_true[order]
    precision_at_k = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at_k * hits).sum() / positives)


def best_f1_thresholds(y_true: IntArray, scores: FloatArray, *, default: float = 0.5) -> list[float]:
    """Per label, the score threshold that maximises F1 (midpoint between neighbouring scores)."""
    thresholds = []
    for j in range(y_true.shape[1]):
        truth, score = y_true[:, j], scores[:, j]
        if truth.sum() == 0 or truth.sum() == len(truth):
            thresholds.append(default)
            continue
        order = np.argsort(-score, kind="stable")
        sorted_scores, hits = score[order], truth[order]
        tp = np.cumsum(hits)
        fp = np.cumsum(1 - hits)
        fn = truth.sum() - tp
        f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        k = int(np.argmax(f1))
        below = sorted_scores[k + 1] if k + 1 < len(sorted_scores) else sorted_scores[k] - 1e-3
        thresholds.append(float((sorted_scores[k] + below) / 2))
    return thresholds


def tagging_metrics(
    y_true: IntArray, probs: FloatArray, label_names: list[str], thresholds: list[float]
) -> dict[str, Any]:
    """multi_label: per-label P/R/F1 at the given thresholds, their macro averages, micro P/R/F1 over every
    (image, tag) decision, mAP (the mean of the labels' average precision), exact-match accuracy (the
    share of images with every tag right), and expected calibration error (per label of its tag
    probability; ``ece`` is their mean)."""
    predicted = probs >= np.asarray(thresholds)[None, :]
    per_label = {}
    aps = []
    for j, name in enumerate(label_names):
        truth, pred = y_true[:, j].astype(bool), predicted[:, j]
        ap = average_precision(y_true[:, j], probs[:, j])
        aps.append(ap)
        per_label[name] = {
            **_prf(float((truth & pred).sum()), float((~truth & pred).sum()), float((truth & ~pred).sum())),
            "average_precision": ap,
            "ece": expected_calibration_error(y_true[:, j], probs[:, j]),
            "threshold": thresholds[j],
            "support": int(truth.sum()),
        }
    truth_all = y_true.astype(bool)
    micro = _prf(
        float((truth_all & predicted).sum()),
        float((~truth_all & predicted).sum()),
        float((truth_all & ~predicted).sum()),
    )
    return {
        "mAP": float(np.mean(aps)) if aps else 0.0,
        "exact_match_accuracy": float(np.mean(np.all(predicted == truth_all, axis=1)))
        if len(y_true)
        else 0.0,
        **_macro(per_label),
        **{f"micro_{k}": v for k, v in micro.items()},
        "ece": float(np.mean([m["ece"] for m in per_label.values()])) if per_label else 0.0,
        "per_label": per_label,
        "test_images": len(y_true),
    }


def regression_metrics(y_true: FloatArray, y_pred: FloatArray, label_names: list[str]) -> dict[str, Any]:
    """regression: MAE, RMSE and R² (averaged over outputs, and per output when there are several)."""
    y_true, y_pred = y_true.reshape(len(y_true), -1), y_pred.reshape(len(y_pred), -1)
    per_label = {}
    for j, name in enumerate(label_names):
        err = y_pred[:, j] - y_true[:, j]
        ss_tot = float(((y_true[:, j] - y_true[:, j].mean()) ** 2).sum())
        per_label[name] = {
            "mae": float(np.abs(err).mean()),
            "rmse": float(np.sqrt((err**2).mean())),
            "r2": 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else 0.0,
        }
    return {
        "mae": float(np.mean([m["mae"] for m in per_label.values()])),
        "rmse": float(np.mean([m["rmse"] for m in per_label.values()])),
        "r2": float(np.mean([m["r2"] for m in per_label.values()])),
        "per_label": per_label,
        "test_images": len(y_true),
    }


_RENAMED = {"precision": "macro_precision", "recall": "macro_recall", "f1": "macro_f1"}


def current_names(task_type: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics recorded before the names said what they are, under today's names (others unchanged).

    Before: top-level ``precision``/``recall``/``f1`` were macro averages, multi_label's ``accuracy``
    was exact-match accuracy, and the confusion matrix was ``{labels, matrix}`` with actual rows.
    """
    if not metrics:
        return {}
    upgraded = {_RENAMED.get(key, key): value for key, value in metrics.items()}
    if task_type == "multi_label" and "accuracy" in upgraded:
        upgraded["exact_match_accuracy"] = upgraded.pop("accuracy")
    matrix = upgraded.get("confusion_matrix")
    if isinstance(matrix, dict) and "matrix" in matrix:
        upgraded["confusion_matrix"] = confusion_matrix(matrix.get("labels", []), matrix["matrix"])
    return upgraded
