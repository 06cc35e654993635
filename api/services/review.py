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

:func:`likely_label_errors` is the same list for the task's labelled images:
those the current model disagrees with (per-image evaluation of the production
version, or the newest: the test split, and the training split out of fold),
the most confident disagreement first, while the image still carries the
labels it was trained with and nobody set them since (an image fixed, or
confirmed by setting its label again, leaves the list).

:func:`apply_review` labels an image in one call: the suggestion as it is, or
the labels (or value) the reviewer chose instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, selectinload

from api.db.models import ImageLabel, ImagePrediction, Label, Model, Task, TaskLabel, TrainingImage, utcnow
from api.services import evaluations
from taskvision.errors import BadRequestError
from taskvision.storage import BlobStore
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


def judging_version(session: Session, task: Task) -> Model | None:
    """The version whose evaluation speaks for the task: production, else the newest."""
    stmt = select(Model).where(Model.task_id == task.id)
    if task.production_version is not None:
        production = session.scalar(stmt.where(Model.version == task.production_version))
        if production is not None:
            return production
    return session.scalar(stmt.order_by(Model.version.desc()).limit(1))


@dataclass(frozen=True)
class _Link:
    label_id: str
    value: float | None
    created: datetime | None


def _still_as_trained(
    task_type: TaskType,
    links: list[_Link],
    record: dict[str, Any],
    negative: str | None,
    since: datetime,
) -> bool:
    """Whether the image's ``links`` (its labels of the task) are the labels (or value) it was
    evaluated with, set before ``since`` (a label set again afterwards, even the same one, was looked
    at by a person)."""
    if any(link.created is not None and link.created > since for link in links):
        return False
    current = {link.label_id: link.value for link in links}
    trained = {str(label["id"]): label.get("value") for label in record.get("true_labels") or []}
    if task_type is TaskType.REGRESSION:
        return set(current) == set(trained) and all(
            (now := current[k]) is not None and abs(float(now) - float(trained[k] or 0.0)) <= 1e-4
            for k in trained
        )
    return set(current) - {negative} == set(trained) - {negative}


def likely_label_errors(
    session: Session, blobs: BlobStore, task: Task
) -> tuple[Model | None, list[tuple[str, dict[str, Any]]]]:
    """Labelled images the model disagrees with, the most confident disagreement first (regression:
    the largest error), as (image id, evaluation record); images deleted or relabelled since are left
    out. Plain rows, not ORM objects: a large task's list is thousands of images, of which a page
    shows a few (:func:`images_by_id` loads those)."""
    model = judging_version(session, task)
    if model is None:
        return None, []
    records = evaluations.disagreements(evaluations.read_predictions(blobs, model))
    ids = [str(record["image_id"]) for record in records]
    existing = set(
        session.scalars(
            select(TrainingImage.id).where(
                TrainingImage.id.in_(ids), TrainingImage.workspace_id == task.workspace_id
            )
        )
    )
    links: dict[str, list[_Link]] = {image_id: [] for image_id in existing}
    for image_id, label_id, value, created in session.execute(
        select(ImageLabel.image_id, ImageLabel.label_id, ImageLabel.value, ImageLabel.created).where(
            ImageLabel.image_id.in_(sorted(existing)), ImageLabel.label_id.in_(_task_labels(task))
        )
    ):
        links[image_id].append(_Link(label_id, value, created))
    negative = next((label.id for label in task.labels if label.negative_for_task == task.id), None)
    task_type = TaskType(task.type)
    chosen = [
        (image_id, record)
        for image_id, record in zip(ids, records, strict=True)
        if image_id in links
        and _still_as_trained(task_type, links[image_id], record, negative, model.created)
    ]
    return model, chosen


def images_by_id(session: Session, workspace_id: str, ids: list[str]) -> dict[str, TrainingImage]:
    """The workspace's images of ``ids`` with their labels, by id (missing ones left out)."""
    return {
        image.id: image
        for image in session.scalars(
            select(TrainingImage)
            .options(selectinload(TrainingImage.label_links))
            .where(TrainingImage.id.in_(ids), TrainingImage.workspace_id == workspace_id)
        )
    }


def evaluated_answer(
    session: Session, blobs: BlobStore, task: Task, image_id: str
) -> list[dict[str, Any]] | None:
    """What the judging version answered for a labelled image in its evaluation (None: not evaluated)."""
    model = judging_version(session, task)
    if model is None:
        return None
    for record in evaluations.read_predictions(blobs, model):
        if record.get("image_id") == image_id:
            return list(record.get("predicted_labels") or [])
    return None


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
    evaluated: Callable[[], list[dict[str, Any]] | None] = lambda: None,
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
        suggested = suggestion(task_type, prediction.answer) if prediction is not None else evaluated()
        if suggested is None:
            raise BadRequestError(
                "The model has no suggestion for this image; send the labels to set.", code="no_suggestion"
            )
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
        # created set here: re-adding a label it had becomes an UPDATE, which a column default skips.
        image.label_links.append(ImageLabel(label_id=lid, value=val, created=utcnow()))
    session.commit()
