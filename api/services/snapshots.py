"""A task's training data as a dataset snapshot: the rows the training queue checks and freezes.

The snapshot holds every image that carries at least one of the task's labels,
with the task's labels on it (and regression values), the user's test flag,
and its content-addressed blob key. Later edits never change a snapshot.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import ImageLabel, Label, Task, TaskLabel, TrainingImage
from taskvision.dataset import DatasetInfo, LabelInfo, ManifestRow
from taskvision.task_types import TaskType


def task_dataset(session: Session, task: Task, snapshot_id: str) -> tuple[DatasetInfo, list[ManifestRow]]:
    """The task's training data as it is now: its labels, and every image that has one of them."""
    labels = session.scalars(
        select(Label)
        .join(TaskLabel, TaskLabel.label_id == Label.id)
        .where(TaskLabel.task_id == task.id)
        .order_by(TaskLabel.created, Label.id)
    ).all()
    label_ids = [label.id for label in labels]
    task_labels = select(TaskLabel.label_id).where(TaskLabel.task_id == task.id)
    links = session.execute(
        select(ImageLabel.image_id, ImageLabel.label_id, ImageLabel.value).where(
            ImageLabel.label_id.in_(task_labels)
        )
    ).all()
    per_image: dict[str, list[tuple[str, float | None]]] = defaultdict(list)
    for image_id, label_id, value in links:
        per_image[image_id].append((label_id, value))
    labelled = select(ImageLabel.image_id).where(ImageLabel.label_id.in_(task_labels))
    images = session.scalars(
        select(TrainingImage)
        .where(TrainingImage.id.in_(labelled), TrainingImage.workspace_id == task.workspace_id)
        .order_by(TrainingImage.created, TrainingImage.id)
    ).all()
    order = {lid: i for i, lid in enumerate(label_ids)}
    rows = []
    for image in images:
        attached = sorted(per_image[image.id], key=lambda pair: order[pair[0]])
        rows.append(
            ManifestRow(
                image_id=image.id,
                blob_key=image.blob_key,
                sha256=image.sha256,
                labels=[lid for lid, _ in attached],
                values={lid: value for lid, value in attached if value is not None},
                test_image=image.test_image,
                width=image.width,
                height=image.height,
            )
        )
    info = DatasetInfo(
        task_id=task.id,
        task_type=TaskType(task.type),
        labels=[LabelInfo(id=lb.id, name=lb.name, negative=lb.negative_for_task == task.id) for lb in labels],
        snapshot_id=snapshot_id,
        created=datetime.now(UTC).isoformat(),
        count=len(rows),
    )
    return info, rows
