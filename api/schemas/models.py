"""Schemas of /recognition/v2/model: a task's trained model versions and their evaluation.

The metrics are named as what they are (``taskvision/metrics.py``): ``macro_*``
average the labels with equal weight, ``micro_*`` pool every (image, tag)
decision, and the confusion matrix names its axes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.db.models import TrainStatus


class _Metrics(BaseModel):
    # Extra figures (e.g. what produced them) pass through.
    model_config = ConfigDict(extra="allow")


class ConfusionMatrix(BaseModel):
    labels: list[str] = Field(description="The label names, in the order of the rows and the columns.")
    rows: Literal["actual"] = Field(description="Rows are the test images' actual labels.")
    columns: Literal["predicted"] = Field(description="Columns are the labels the model predicted.")
    actual_by_predicted: list[list[int]] = Field(
        description="actual_by_predicted[i][j]: test images of actual label labels[i] predicted as labels[j]."
    )


class ClassPerLabel(_Metrics):
    precision: float = Field(description="Of the test images predicted as this label, the share that were.")
    recall: float = Field(description="Of the test images of this label, the share predicted as it.")
    f1: float = Field(description="Harmonic mean of precision and recall.")
    support: int = Field(description="Test images of this label.")


class ClassificationMetrics(_Metrics):
    """multi_class (categorization) on the test split."""

    accuracy: float = Field(description="Share of test images whose predicted label is the actual one.")
    macro_precision: float = Field(description="Mean of the labels' precision, each label weighted the same.")
    macro_recall: float = Field(description="Mean of the labels' recall, each label weighted the same.")
    macro_f1: float = Field(description="Mean of the labels' F1, each label weighted the same.")
    ece: float = Field(description="Expected calibration error of the top probability (0 = calibrated).")
    per_label: dict[str, ClassPerLabel]
    confusion_matrix: ConfusionMatrix
    test_images: int


class TagPerLabel(ClassPerLabel):
    average_precision: float = Field(description="Area under this tag's precision-recall curve.")
    ece: float = Field(description="Expected calibration error of this tag's probability.")
    threshold: float = Field(description="The probability from which the tag is answered.")


class TaggingMetrics(_Metrics):
    """multi_label (tagging) on the test split, each tag decided at its threshold."""

    mAP: float = Field(description="Mean over the tags of their average precision (threshold-free).")
    exact_match_accuracy: float = Field(description="Share of test images with every tag decision right.")
    macro_precision: float = Field(description="Mean of the tags' precision, each tag weighted the same.")
    macro_recall: float = Field(description="Mean of the tags' recall, each tag weighted the same.")
    macro_f1: float = Field(description="Mean of the tags' F1, each tag weighted the same.")
    micro_precision: float = Field(description="Precision over every (image, tag) decision pooled.")
    micro_recall: float = Field(description="Recall over every (image, tag) decision pooled.")
    micro_f1: float = Field(description="F1 of the pooled micro precision and recall.")
    ece: float = Field(description="Mean of the tags' expected calibration error.")
    per_label: dict[str, TagPerLabel]
    test_images: int


class ValuePerLabel(_Metrics):
    mae: float
    rmse: float
    r2: float


class RegressionMetrics(_Metrics):
    """regression on the test split, of the answers as served (clipped to the value range)."""

    mae: float = Field(description="Mean absolute error, in the values' units.")
    rmse: float = Field(description="Root mean squared error, in the values' units.")
    r2: float = Field(description="Coefficient of determination (1 = perfect, 0 = the mean's quality).")
    out_of_range: int = Field(
        default=0, description="Test images whose raw answer fell outside the value range."
    )
    per_label: dict[str, ValuePerLabel]
    test_images: int


# An imported bundle, a version without test images, or one from before these names: a plain object.
Metrics = ClassificationMetrics | TaggingMetrics | RegressionMetrics | dict[str, Any]


class ModelPublic(BaseModel):
    id: str
    task: str
    task_name: str
    version: int
    train_status: TrainStatus
    production: bool = Field(description="Whether classify answers with this version by default.")
    metrics: Metrics = Field(description="The evaluation on the test split.")
    run_id: str | None = Field(description="The training run that made it (null: an imported bundle).")
    created: datetime


class PredictedLabel(BaseModel):
    id: str
    name: str
    prob: float | None = Field(default=None, description="The model's probability (categorization, tagging).")
    value: float | None = Field(default=None, description="The value (regression).")


class ImageLinksPublic(BaseModel):
    img_path: str
    thumb_img_path: str


class ImagePredictionPublic(BaseModel):
    """What a version answered for one image of its evaluation."""

    image_id: str
    split: Literal["test", "train"] = Field(
        description="test: a test-split image answered by the version; train: a training image answered "
        "by a model of the model selection that did not see it (out of fold)."
    )
    true_labels: list[PredictedLabel] = Field(description="The image's labels (or value) when trained.")
    predicted_labels: list[PredictedLabel] = Field(description="The answer: the label, tags or value.")
    scores: list[PredictedLabel] = Field(
        default=[], description="Every label's probability (not for regression)."
    )
    confidence: float | None = Field(
        description="How sure the answer was: the top probability (categorization), the least sure tag's "
        "max(p, 1 - p) (tagging); null for regression."
    )
    error: float | None = Field(default=None, description="Regression: the absolute error.")
    out_of_range: bool | None = Field(
        default=None, description="Regression: the raw answer was outside the range."
    )
    correct: bool = Field(
        description="Right label or every tag right; regression: error at most twice the test MAE."
    )
    image: ImageLinksPublic | None = Field(description="Links to the image (null: it was deleted since).")


class EvaluationReport(BaseModel):
    model: str
    task: str
    version: int
    task_type: str
    markdown: str = Field(description="The report as Markdown (also GET ...?format=markdown).")
    metrics: Metrics
    selection: dict[str, Any] = Field(description="What model selection tried and chose, with CV scores.")
    training: dict[str, Any] = Field(description="The training's effective parameters.")
