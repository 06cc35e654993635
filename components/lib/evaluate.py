"""Evaluate step: metrics of the trained model on the test split.

multi_class: accuracy, macro and per-label precision/recall/F1, confusion
matrix (also logged as a KFP ClassificationMetrics artifact, which the
Kubeflow UI draws), expected calibration error (ECE). multi_label: per-label
precision/recall/F1 at the thresholds the train step chose on the training
split, mAP, ECE. regression: MAE, RMSE, R² of the answers as served (clipped
to the bundle's value range), and how many fell outside it. Probabilities come
from :class:`taskvision.inference.BundleModel`, the same code path serving
uses. The Markdown report also shows what model selection tried and chose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from taskvision.bundle import clip_values
from taskvision.inference import BundleModel
from taskvision.metrics import classification_metrics, regression_metrics, tagging_metrics
from taskvision.task_types import TaskType


def evaluate_model(model_dir: Path) -> dict[str, Any]:
    """Metrics of the model folder written by the train step, on its test inputs."""
    model = BundleModel.load(model_dir)
    data = np.load(model_dir / "test_inputs.npz")
    if model.meta.frozen_backbone:
        logits = model.logits_from_embeddings(data["embeddings"])
    else:
        logits = model.logits_from_arrays(data["images"])
    outputs = model.outputs(logits)
    names = [label["name"] for label in model.meta.labels]
    y = data["targets"]
    task_type = model.meta.task_type
    if len(y) == 0:
        return {"test_images": 0}
    if task_type is TaskType.MULTI_CLASS:
        return classification_metrics(y.astype(np.int64), outputs, names)
    if task_type is TaskType.MULTI_LABEL:
        return tagging_metrics(y.astype(np.int64), outputs, names, model.meta.thresholds)
    clipped, outside = clip_values(model.meta, outputs)
    return {**regression_metrics(y, clipped, names), "out_of_range": int(outside.sum())}


def markdown_report(
    task_type: TaskType, metrics: dict[str, Any], *, selection: dict[str, Any] | None = None
) -> str:
    """A short report for the Kubeflow UI: test metrics, per label, and the model selection."""
    headline = {
        TaskType.MULTI_CLASS: ("accuracy", "precision", "recall", "f1", "ece"),
        TaskType.MULTI_LABEL: ("mAP", "precision", "recall", "f1", "ece"),
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
        if selection.get("skipped"):
            lines += ["", "Not tried (time budget): " + ", ".join(selection["skipped"]) + "."]
    return "\n".join(lines) + "\n"
