"""Evaluate step: metrics of the trained model on the test split, and its answer for every image.

multi_class: accuracy, macro and per-label precision/recall/F1, confusion
matrix (also logged as a KFP ClassificationMetrics artifact, which the
Kubeflow UI draws), expected calibration error (ECE). multi_label: per-label
precision/recall/F1 at the thresholds the train step chose on the training
split, their macro and micro averages, mAP, exact-match accuracy, ECE.
regression: MAE, RMSE, R² of the answers as served (clipped to the bundle's
value range), and how many fell outside it. Probabilities come from
:class:`taskvision.inference.BundleModel`, the same code path serving uses.

Per-image predictions (``predictions.jsonl`` in the bundle, one JSON object a
line): every test image, and every training image as answered by a model of
model selection that did not see it (out of fold, ``train_oof.npz``), so a
user can find the test images the model gets wrong and the training images
whose label the model disputes. The metrics come from FP32 embeddings and say
so (``"backbone_precision": "fp32"``; a server may answer with an INT8
backbone, within the tolerance :mod:`taskvision.quantize` checks). The
Markdown report also shows what model
selection tried and chose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from components.lib.refit import model_arrays
from components.lib.train import TEST_INPUTS_FILE, TRAIN_OOF_FILE
from taskvision.bundle import MODEL_FILE, BundleMeta, clip_values, outputs_from_logits
from taskvision.inference import BundleModel
from taskvision.metrics import classification_metrics, regression_metrics, tagging_metrics
from taskvision.task_types import TaskType

Array = npt.NDArray[Any]

METRICS_PRECISION = "fp32"  # the backbone precision the train step embedded the test split with

# A regression answer counts as wrong when its error is above this many times the test MAE:
# the outliers worth a look, not the usual noise around every answer.
REGRESSION_WRONG_FACTOR = 2.0


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)


def _outputs(meta: BundleMeta, model_dir: Path, data: Any) -> Array:
    if "logits" in data:
        # The train step ran the exported network on the test images (a network that does not
        # end in one linear layer: a partial fine-tune averaged with a distribution head).
        return outputs_from_logits(meta, data["logits"].astype(np.float32))
    if "features" in data:
        # A partial fine-tune's test images as its last layer reads them (the train step ran the
        # exported network on them): that layer is all that is left to compute.
        w, b = model_arrays(model_dir / MODEL_FILE)
        return outputs_from_logits(meta, data["features"].astype(np.float32) @ w.T + b)
    model = BundleModel.load(model_dir)
    if meta.frozen_backbone:
        return model.outputs(model.logits_from_embeddings(data["embeddings"]))
    return model.outputs(model.logits_from_arrays(data["images"]))


def _ids(data: Any, n: int) -> list[str]:
    return [str(i) for i in data["image_ids"]] if "image_ids" in data else [f"#{i}" for i in range(n)]


def evaluate(model_dir: Path) -> Evaluation:
    """Metrics of the model folder written by the train step on its test inputs, and per-image predictions."""
    meta = BundleMeta.from_json((model_dir / "bundle.json").read_text())
    data = np.load(model_dir / TEST_INPUTS_FILE)
    y = data["targets"]
    if len(y) == 0:
        return Evaluation({"test_images": 0, "backbone_precision": METRICS_PRECISION})
    outputs = _outputs(meta, model_dir, data)
    names = [label["name"] for label in meta.labels]
    metrics: dict[str, Any]
    if meta.task_type is TaskType.MULTI_CLASS:
        metrics = classification_metrics(y.astype(np.int64), outputs, names)
    elif meta.task_type is TaskType.MULTI_LABEL:
        metrics = tagging_metrics(y.astype(np.int64), outputs, names, meta.thresholds)
    else:
        clipped, outside = clip_values(meta, outputs)
        metrics = {**regression_metrics(y, clipped, names), "out_of_range": int(outside.sum())}
    metrics["backbone_precision"] = METRICS_PRECISION
    tolerance = REGRESSION_WRONG_FACTOR * float(metrics.get("mae", 0.0))
    predictions = image_predictions(meta, "test", _ids(data, len(y)), y, outputs, tolerance=tolerance)
    oof_path = model_dir / TRAIN_OOF_FILE
    if oof_path.is_file():
        oof = np.load(oof_path)
        oof_outputs = outputs_from_logits(meta, oof["logits"].astype(np.float32))
        predictions += image_predictions(
            meta, "train", _ids(oof, len(oof["targets"])), oof["targets"], oof_outputs, tolerance=tolerance
        )
    return Evaluation(metrics, predictions)


def evaluate_model(model_dir: Path) -> dict[str, Any]:
    """Metrics of the model folder written by the train step, on its test inputs."""
    return evaluate(model_dir).metrics


def _label(meta: BundleMeta, index: int, **extra: Any) -> dict[str, Any]:
    label = meta.labels[index]
    return {"id": label["id"], "name": label["name"], **extra}


def image_predictions(
    meta: BundleMeta, split: str, image_ids: list[str], targets: Array, outputs: Array, *, tolerance: float
) -> list[dict[str, Any]]:
    """One record per image: true and predicted labels (or values), every score, confidence, right or not.

    ``confidence`` is how sure the model was of the answer it gave: the top probability
    (multi_class), or the least sure tag decision, max(p, 1 - p) (multi_label). Regression
    records carry the absolute ``error`` instead, and count as right within ``tolerance``.
    """
    records: list[dict[str, Any]] = []
    negative = [dict(meta.negative_label)] if meta.negative_label else []
    for image_id, target, output in zip(image_ids, targets, outputs, strict=True):
        record: dict[str, Any] = {"image_id": image_id, "split": split}
        if meta.task_type is TaskType.MULTI_CLASS:
            actual, predicted = int(target), int(np.argmax(output))
            record.update(
                true_labels=[_label(meta, actual)],
                predicted_labels=[_label(meta, predicted, prob=round(float(output[predicted]), 5))],
                scores=[_label(meta, j, prob=round(float(p), 5)) for j, p in enumerate(output)],
                confidence=round(float(output[predicted]), 5),
                correct=actual == predicted,
            )
        elif meta.task_type is TaskType.MULTI_LABEL:
            truth = np.asarray(target).astype(bool)
            chosen = output >= np.asarray(meta.thresholds, dtype=np.float32)
            record.update(
                true_labels=[_label(meta, int(j)) for j in np.flatnonzero(truth)] or negative,
                predicted_labels=[
                    _label(meta, int(j), prob=round(float(output[j]), 5)) for j in np.flatnonzero(chosen)
                ]
                or negative,
                scores=[_label(meta, j, prob=round(float(p), 5)) for j, p in enumerate(output)],
                confidence=round(float(np.min(np.maximum(output, 1.0 - output))), 5) if len(output) else 1.0,
                correct=bool(np.array_equal(truth, chosen)),
            )
        else:
            actual_values = np.asarray(target, dtype=np.float32).reshape(-1)
            clipped, outside = clip_values(meta, np.asarray(output, dtype=np.float32).reshape(1, -1))
            error = float(np.mean(np.abs(clipped[0] - actual_values)))
            record.update(
                true_labels=[_label(meta, j, value=round(float(v), 5)) for j, v in enumerate(actual_values)],
                predicted_labels=[
                    _label(meta, j, value=round(float(v), 5)) for j, v in enumerate(clipped[0])
                ],
                error=round(error, 5),
                out_of_range=bool(outside[0]),
                confidence=None,
                correct=error <= tolerance,
            )
        records.append(record)
    return records


def write_predictions(path: Path, predictions: list[dict[str, Any]]) -> None:
    with open(path, "w") as fh:
        for record in predictions:
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")


def markdown_report(
    task_type: TaskType, metrics: dict[str, Any], *, selection: dict[str, Any] | None = None
) -> str:
    """A short report for the Kubeflow UI: test metrics, per label, and the model selection."""
    headline = {
        TaskType.MULTI_CLASS: ("accuracy", "macro_precision", "macro_recall", "macro_f1", "ece"),
        TaskType.MULTI_LABEL: (
            "mAP",
            "exact_match_accuracy",
            "macro_precision",
            "macro_recall",
            "macro_f1",
            "micro_f1",
            "ece",
        ),
        TaskType.REGRESSION: ("mae", "rmse", "r2", "out_of_range"),
    }[task_type]
    lines = [f"# Evaluation ({task_type}, {metrics.get('test_images', 0)} test images)", ""]
    lines += ["| metric | value |", "|---|---:|"] + [f"| {k} | {metrics.get(k, 0):.4f} |" for k in headline]
    per_label = metrics.get("per_label", {})
    if per_label:
        columns = [c for c in next(iter(per_label.values())) if c != "support"] + ["support"]
        lines += [
            "",
            "## Per label",
            "",
            "| label | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for name, values in per_label.items():
            cells = [
                f"{values[c]:.3f}" if isinstance(values.get(c), float) else str(values.get(c, ""))
                for c in columns
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    matrix = metrics.get("confusion_matrix")
    if matrix and "actual_by_predicted" in matrix:
        labels = matrix["labels"]
        lines += [
            "",
            "## Confusion matrix",
            "",
            "Rows: the actual label; columns: the predicted label.",
            "",
            "| actual \\ predicted | " + " | ".join(labels) + " |",
            "|---|" + "---:|" * len(labels),
        ]
        for name, row in zip(labels, matrix["actual_by_predicted"], strict=True):
            lines.append(f"| {name} | " + " | ".join(str(n) for n in row) + " |")
    if selection:
        lines += [
            "",
            "## Model selection",
            "",
            f"Quality `{selection.get('quality')}`: chose **{selection.get('chosen')}** by "
            f"{selection.get('folds')}-fold cross-validation on the training split "
            f"({selection.get('metric')} on {selection.get('scored_rows')} out-of-fold images, "
            f"{selection.get('seconds', 0):.1f} s).",
            "",
            "| candidate | kind | cross-validated score | head | serving cost (Lite0 = 1) | seconds |",
            "|---|---|---:|---|---:|---:|",
        ]
        for row in selection.get("candidates", []):
            mark = " (chosen)" if row["name"] == selection.get("chosen") else ""
            head = row.get("head") or "-"
            lines.append(
                f"| {row['name']}{mark} | {row['kind']} | {row['cv_score']:.4f} | {head} "
                f"| {row['serving_cost']:.1f} | {row['seconds']:.1f} |"
            )
        reused = selection.get("reused")
        if reused:
            lines += [
                "",
                f"A retrain: {reused['changed_images']} of {reused['images']} images changed since the last "
                f"full selection, so only its choice (**{reused['chosen']}**, from run {reused['from_run']}) "
                "was refitted, its head's penalty chosen again by cross-validation.",
            ]
        if selection.get("skipped"):
            lines += ["", "Not tried (time budget): " + ", ".join(selection["skipped"]) + "."]
    return "\n".join(lines) + "\n"
