"""The review queue: images classify stored, most uncertain first, with the label the model suggests.

Classify with ``store_images`` keeps each image as an unlabelled training image
and, here, what the task's model answered for it (:func:`record_prediction`).
The queue lists a task's stored images that have none of its labels yet, the
most uncertain first, so that each label a person adds teaches the model the
most (uncertainty sampling):

* multi_class: one minus the margin between the two most likely labels;
* multi_label: the highest binary entropy among the tags (a tag near 50 %);
* regression: 1 when the raw prediction fell outside the training range
  (``out_of_range``), else 0 (then the newest first).

:func:`apply_review` labels an image in one call: the suggestion as it is, or
the labels (or value) the reviewer chose instead.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from api.db.models import ImageLabel, ImagePrediction, Label, Task, TaskLabel, TrainingImage, utcnow
from taskvision.errors import BadRequestError
from taskvision.task_types import LabelType, TaskType


def uncertainty(task_type: TaskType, answer: dict[str, Any]) -> float:
    """0 (sure) .. 1 (unsure) for one classify answer of a task of ``task_type``."""
    labels = answer.get("labels") or []
    if task_type is TaskType.REGRESSION:
        return 1.0 if answer.get("out_of_range") else 0.0
    probs = sorted((float(label.get("prob", 0.0)) for label in labels), reverse=True)
    if not probs:
        return 0.0
    if task_type is TaskType.MULTI_CLASS:
        second = probs[1] if len(probs) > 1 else 0.0
        return round(1.0 - (probs[0] - second), 6)
    return round(max(_binary_entropy(p) for p in probs), 6)


def _binary_entropy(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def record_prediction(
    session: Session, *, image_id: str, task: Task, version: int, answer: dict[str, Any]
) -> None:
    """Remember what ``task``'s model answered for a stored image (the latest answer wins; committed)."""
    kept: dict[str, Any] = {
        key: answer[key] for key in ("best_label", "labels", "out_of_range") if key in answer
    }
    row = session.get(ImagePrediction, (image_id, task.id))
    if row is None:
        row = ImagePrediction(image_id=image_id, task_id=task.id)
        session.add(row)
    row.version, row.answer = version, kept
    row.uncertainty = uncertainty(TaskType(task.type), kept)
    row.created = utcnow()
    session.commit()


def _task_labels(task: Task) -> Any:
    return select(TaskLabel.label_id).where(TaskLabel.task_id == task.id)


def uncertain_images(task: Task) -> Any:
    """The statement for the queue: stored, predicted, not yet labelled for this task; unsure first."""
    labelled = exists().where(
        ImageLabel.image_id == TrainingImage.id, ImageLabel.label_id.in_(_task_labels(task))
    )
    return (
        select(TrainingImage, ImagePrediction)
        .join(ImagePrediction, ImagePrediction.image_id == TrainingImage.id)
        .where(
            ImagePrediction.task_id == task.id,
            TrainingImage.workspace_id == task.workspace_id,
            ~labelled,
        )
        .order_by(ImagePrediction.uncertainty.desc(), ImagePrediction.created.desc(), TrainingImage.id)
    )


def suggestion(task_type: TaskType, answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The labels the model suggests, as a list ({id, name, prob} or, regression, {id, name, value})."""
    best = answer.get("best_label")
    if best is None:
        return []
    return list(best) if isinstance(best, list) else [best]


def apply_review(
    session: Session,
    task: Task,
    image: TrainingImage,
    *,
    label_ids: list[str] | None,
    value: float | None,
) -> None:
    """Label ``image`` for ``task``: the suggestion when nothing is given, else the labels or value given.

    The image's labels of this task are replaced (its labels of other tasks stay). Commits.
    """
    task_type = TaskType(task.type)
    labels = {
        label.id: label
        for label in session.scalars(
            select(Label).join(TaskLabel, TaskLabel.label_id == Label.id).where(TaskLabel.task_id == task.id)
        )
    }
    values: dict[str, float | None] = {}
    if label_ids is None and value is None:
        prediction = session.get(ImagePrediction, (image.id, task.id))
        if prediction is None:
            raise BadRequestError(
                "The model has no suggestion for this image; send the labels to set.", code="no_suggestion"
            )
        suggested = suggestion(task_type, prediction.answer)
        if task_type is TaskType.REGRESSION:
            values = {str(item["id"]): float(item["value"]) for item in suggested}
        else:
            values = {str(item["id"]): None for item in suggested}
    elif task_type is TaskType.REGRESSION:
        if value is None or not math.isfinite(value):
            raise BadRequestError("A regression image needs a finite 'value'.", code="value_required")
        outputs = [lid for lid, label in labels.items() if label.type == LabelType.VALUE]
        values = {outputs[0]: value} if outputs else {}
    else:
        values = {lid: None for lid in label_ids or []}
    unknown = [lid for lid in values if lid not in labels]
    if unknown:
        raise BadRequestError(
            f"Label {unknown[0]} is not a label of task '{task.name}'.", code="unknown_label"
        )
    if task_type is TaskType.MULTI_CLASS and len(values) != 1:
        raise BadRequestError("A categorization image takes exactly one label.", code="one_category")
    if task_type is TaskType.MULTI_LABEL and not values:
        negative = next((lid for lid, label in labels.items() if label.negative_for_task == task.id), None)
        if negative is not None:
            values = {negative: None}  # "none of the tags"
    image.label_links[:] = [link for link in image.label_links if link.label_id not in labels]
    for lid, val in values.items():
        image.label_links.append(ImageLabel(label_id=lid, value=val))
    session.commit()
