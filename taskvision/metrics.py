"""Evaluation metrics for the three task types (numpy only, so any unit can use them)."""

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
    macro = {k: float(np.mean([m[k] for m in per_label.values()])) for k in ("precision", "recall", "f1")}
    return {
        "accuracy": _safe_div(float(np.trace(confusion)), float(confusion.sum())),
        "precision": macro["precision"],
        "recall": macro["recall"],
        "f1": macro["f1"],
        "ece": expected_calibration_error((y_pred == y_true).astype(float), probs.max(axis=1)),
        "per_label": per_label,
        "confusion_matrix": {"labels": label_names, "matrix": confusion.tolist()},
        "test_images": len(y_true),
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
    """multi_label: per-label P/R/F1 at the given thresholds, macro averages, mAP, exact-match accuracy,
    and expected calibration error (per label of its tag probability; ``ece`` is their mean)."""
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
    macro = {k: float(np.mean([m[k] for m in per_label.values()])) for k in ("precision", "recall", "f1")}
    return {
        "mAP": float(np.mean(aps)) if aps else 0.0,
        "accuracy": float(np.mean(np.all(predicted == y_true.astype(bool), axis=1))),
        "precision": macro["precision"],
        "recall": macro["recall"],
        "f1": macro["f1"],
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
