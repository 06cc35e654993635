"""A model version's metrics as the console shows them: headline figures, per-label rows, confusion.

The metrics are what the pipeline's evaluate step stored with the version
(``taskvision.metrics``); :func:`mistakes` turns the version's per-image
predictions into the gallery's cards, and :func:`regression_charts` into a
regression version's scatter plot and error histogram; :func:`evaluation_mistakes`
into the images the grid's "wrong in the last evaluation" filter shows. Names are
read with their newer spellings first (``macro_f1``, a confusion matrix as
``actual_by_predicted``) and the current ones after (``f1``, ``matrix``), so the
page keeps working as the report gains precise names. The confusion matrix's
rows are the actual labels and its columns the predicted ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from api.console.charts import Histogram, Scatter, histogram, scatter
from api.console.queries import MAX_MISTAKES, EvaluationMistakes
from api.db.models import Task, TrainingImage
from api.services import evaluations, review
from components.lib.evaluate import REGRESSION_WRONG_FACTOR
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType

HEAT_LEVELS = 10  # CSS classes heat-0 .. heat-9 (no inline styles under the CSP)


def _get(metrics: dict[str, Any], *names: str) -> Any:
    for name in names:
        if name in metrics:
            return metrics[name]
    return None


@dataclass(frozen=True)
class Figure:
    """A headline figure: its name, its value, and what it means."""

    name: str
    value: Any
    help: str
    percent: bool = False


def headline(task_type: str, metrics: dict[str, Any]) -> list[Figure]:
    """The few figures a version is judged by (the versions list and the compare view)."""
    if task_type == TaskType.MULTI_CLASS:
        return [
            Figure(
                "Accuracy", _get(metrics, "accuracy"), "Share of test images whose top label is right.", True
            ),
            Figure(
                "Macro F1",
                _get(metrics, "macro_f1", "f1"),
                "F1 averaged over labels, each label counting the same.",
            ),
            Figure(
                "Macro precision",
                _get(metrics, "macro_precision", "precision"),
                "Precision averaged over labels.",
            ),
            Figure("Macro recall", _get(metrics, "macro_recall", "recall"), "Recall averaged over labels."),
        ]
    if task_type == TaskType.MULTI_LABEL:
        return [
            Figure("mAP", _get(metrics, "mAP", "map"), "Mean over tags of the average precision."),
            Figure(
                "Macro F1", _get(metrics, "macro_f1", "f1"), "F1 at each tag's threshold, averaged over tags."
            ),
            Figure(
                "Macro precision",
                _get(metrics, "macro_precision", "precision"),
                "Precision averaged over tags.",
            ),
            Figure("Macro recall", _get(metrics, "macro_recall", "recall"), "Recall averaged over tags."),
        ]
    return [
        Figure("MAE", _get(metrics, "mae"), "Mean absolute error, in the label's units."),
        Figure("RMSE", _get(metrics, "rmse"), "Root mean squared error, in the label's units."),
        Figure("R²", _get(metrics, "r2"), "Share of the value's variance the model explains (1 is perfect)."),
    ]


@dataclass(frozen=True)
class LabelRow:
    name: str
    values: dict[str, Any]


@dataclass(frozen=True)
class ConfusionCell:
    actual: str
    predicted: str
    count: int
    share: float  # of the actual label's test images
    heat: int

    @property
    def correct(self) -> bool:
        return self.actual == self.predicted


@dataclass(frozen=True)
class ConfusionMatrix:
    labels: list[str]
    rows: list[list[ConfusionCell]]
    totals: list[int]


@dataclass
class Evaluation:
    task_type: str
    test_images: int | None
    figures: list[Figure]
    columns: list[tuple[str, str]]  # per-label table: (key, title)
    per_label: list[LabelRow]
    confusion: ConfusionMatrix | None = None
    notes: list[str] = field(default_factory=list)


_COLUMNS = {
    TaskType.MULTI_CLASS: [
        ("precision", "Precision"),
        ("recall", "Recall"),
        ("f1", "F1"),
        ("support", "Support"),
    ],
    TaskType.MULTI_LABEL: [
        ("precision", "Precision"),
        ("recall", "Recall"),
        ("f1", "F1"),
        ("average_precision", "AP"),
        ("threshold", "Threshold"),
        ("support", "Support"),
    ],
    TaskType.REGRESSION: [("mae", "MAE"), ("rmse", "RMSE"), ("r2", "R²")],
}


def confusion_matrix(metrics: dict[str, Any]) -> ConfusionMatrix | None:
    data = metrics.get("confusion_matrix")
    if not isinstance(data, dict):
        return None
    labels = [str(name) for name in data.get("labels", [])]
    matrix = _get(data, "actual_by_predicted", "matrix")
    if not labels or not isinstance(matrix, list) or len(matrix) != len(labels):
        return None
    rows, totals = [], []
    for actual, counts in zip(labels, matrix, strict=True):
        total = int(sum(counts))
        totals.append(total)
        row = []
        for predicted, count in zip(labels, counts, strict=True):
            share = count / total if total else 0.0
            row.append(
                ConfusionCell(
                    actual=actual,
                    predicted=predicted,
                    count=int(count),
                    share=share,
                    heat=min(HEAT_LEVELS - 1, math.floor(share * HEAT_LEVELS)) if count else 0,
                )
            )
        rows.append(row)
    return ConfusionMatrix(labels=labels, rows=rows, totals=totals)


def evaluation(task_type: str, metrics: dict[str, Any]) -> Evaluation:
    """Everything the evaluation page draws for one version."""
    kind = TaskType(task_type)
    per_label = metrics.get("per_label") if isinstance(metrics.get("per_label"), dict) else {}
    rows = [
        LabelRow(str(name), dict(values))
        for name, values in (per_label or {}).items()
        if isinstance(values, dict)
    ]
    result = Evaluation(
        task_type=kind,
        test_images=metrics.get("test_images"),
        figures=headline(kind, metrics),
        columns=_COLUMNS[kind],
        per_label=rows,
    )
    if kind is TaskType.MULTI_CLASS:
        result.confusion = confusion_matrix(metrics)
    if kind is TaskType.MULTI_LABEL:
        result.notes.append(
            "A tag is predicted when its probability reaches the tag's threshold, chosen on the training "
            "images to give the best F1."
        )
    if not metrics:
        result.notes.append("This version was stored without metrics (an imported bundle).")
    return result


@dataclass(frozen=True)
class Comparison:
    """Two versions side by side: each figure and per-label F1 (or MAE) with the change."""

    figures: list[tuple[str, Any, Any, bool]]  # name, a, b, percent
    per_label: list[tuple[str, Any, Any]]
    per_label_metric: str


def compare(task_type: str, a: dict[str, Any], b: dict[str, Any]) -> Comparison:
    left, right = headline(task_type, a), headline(task_type, b)
    figures = [(x.name, x.value, y.value, x.percent) for x, y in zip(left, right, strict=True)]
    key = "mae" if task_type == TaskType.REGRESSION else "f1"
    names: list[str] = []
    for metrics in (a, b):
        for name in metrics.get("per_label") or {}:
            if name not in names:
                names.append(name)

    def value(metrics: dict[str, Any], name: str) -> Any:
        return ((metrics.get("per_label") or {}).get(name) or {}).get(key)

    return Comparison(
        figures=figures,
        per_label=[(name, value(a, name), value(b, name)) for name in names],
        per_label_metric="MAE" if key == "mae" else "F1",
    )


# ---- per-image predictions ------------------------------------------------------------------


@dataclass(frozen=True)
class MistakeCard:
    """An image of the evaluation with what it was labelled, what the version answered, and now."""

    image_id: str
    file_name: str
    exists: bool  # the image was deleted since
    split: str
    correct: bool
    true_labels: list[str]
    predicted_labels: list[str]
    confidence: float | None
    error: float | None
    fixed: bool  # the image now carries what the version predicted


@dataclass
class Gallery:
    cards: list[MistakeCard]
    total: int
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.page_size))


def _names(labels: list[dict[str, Any]]) -> list[str]:
    out = []
    for label in labels:
        value = label.get("value")
        out.append(
            f"{label.get('name')} = {value:.2f}" if isinstance(value, int | float) else str(label.get("name"))
        )
    return out


def _now_as_predicted(task: Task, image: TrainingImage, record: dict[str, Any]) -> bool:
    task_labels = {label.id for label in task.labels}
    current = {link.label_id: link.value for link in image.label_links if link.label_id in task_labels}
    predicted = {str(label["id"]): label.get("value") for label in record.get("predicted_labels") or []}
    if task.type == TaskType.REGRESSION:
        return set(current) == set(predicted) and all(
            (now := current[k]) is not None and abs(float(now) - float(predicted[k] or 0.0)) <= 1e-4
            for k in predicted
        )
    return set(current) == set(predicted)


def mistakes(
    session: Session, task: Task, records: Sequence[dict[str, Any]], *, page: int, page_size: int
) -> Gallery:
    """One page of ``records`` (already filtered and ordered) as gallery cards (one query)."""
    total = len(records)
    page = max(1, min(page, max(1, math.ceil(total / page_size))))
    shown = list(records[(page - 1) * page_size : page * page_size])
    ids = [str(r.get("image_id")) for r in shown]
    images = {
        image.id: image
        for image in session.scalars(
            select(TrainingImage)
            .options(selectinload(TrainingImage.label_links))
            .where(TrainingImage.id.in_(ids), TrainingImage.workspace_id == task.workspace_id)
        )
    }
    cards = []
    for record in shown:
        image = images.get(str(record.get("image_id")))
        meta = (image.meta_data or {}) if image is not None else {}
        cards.append(
            MistakeCard(
                image_id=str(record.get("image_id")),
                file_name=str(meta.get("file_name") or f"Image {str(record.get('image_id'))[:8]}"),
                exists=image is not None,
                split=str(record.get("split", "test")),
                correct=bool(record.get("correct")),
                true_labels=_names(record.get("true_labels") or []),
                predicted_labels=_names(record.get("predicted_labels") or []),
                confidence=record.get("confidence"),
                error=record.get("error"),
                fixed=image is not None and _now_as_predicted(task, image, record),
            )
        )
    return Gallery(cards=cards, total=total, page=page, page_size=page_size)


# ---- regression charts ----------------------------------------------------------------------


@dataclass(frozen=True)
class RegressionCharts:
    """A regression version's test images: predicted against actual, and how far off they were."""

    label: str  # the value label's name (the axes' unit)
    scatter: Scatter
    errors: Histogram
    tolerance: float | None


def _first_value(labels: list[dict[str, Any]]) -> tuple[str, float] | None:
    value = labels[0].get("value") if labels else None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return str(labels[0].get("name", "")), float(labels[0]["value"])


def regression_charts(records: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> RegressionCharts | None:
    """From the test split's records (``evaluations.select``): None when none carries values.

    An answer is wrong further off than the evaluate step's tolerance (``REGRESSION_WRONG_FACTOR``
    times the MAE): the records' own ``correct`` says so; the tolerance is drawn from the MAE.
    """
    pairs: list[tuple[float, float, bool]] = []
    errors: list[float] = []
    name = ""
    for record in records:
        actual = _first_value(record.get("true_labels") or [])
        predicted = _first_value(record.get("predicted_labels") or [])
        if actual is None or predicted is None:
            continue
        name = name or actual[0]
        pairs.append((actual[1], predicted[1], not record.get("correct", True)))
        error = record.get("error")
        errors.append(float(error) if isinstance(error, int | float) else abs(predicted[1] - actual[1]))
    mae = metrics.get("mae")
    tolerance = REGRESSION_WRONG_FACTOR * float(mae) if isinstance(mae, int | float) and mae > 0 else None
    points, bars = scatter(pairs), histogram(errors, tolerance=tolerance)
    if points is None or bars is None:
        return None
    return RegressionCharts(label=name, scatter=points, errors=bars, tolerance=tolerance)


# ---- the image grid's "wrong in the last evaluation" ---------------------------------------------


def evaluation_mistakes(session: Session, blobs: BlobStore, task: Task) -> EvaluationMistakes | None:
    """What the version that speaks for the task (production, else the newest) got wrong in its
    evaluation; None when it has no per-image predictions (or there is no version)."""
    model = review.judging_version(session, task)
    records = evaluations.read_predictions(blobs, model) if model is not None else []
    if model is None or not records:
        return None
    wrong = evaluations.select(records, evaluations.PredictionFilter(split="all", wrong=True))
    every = [str(r.get("image_id")) for r in wrong]
    test = [str(r.get("image_id")) for r in wrong if r.get("split") == "test"]
    return EvaluationMistakes(
        version=model.version,
        test_ids=test[:MAX_MISTAKES],
        all_ids=every[:MAX_MISTAKES],
        capped=len(every) > MAX_MISTAKES,
    )
