"""Freeze a task's training data into an immutable dataset snapshot in the blob store.

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
from taskvision import blob_layout
from taskvision.dataset import DatasetInfo, LabelInfo, ManifestRow, write_snapshot
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType


def create_snapshot(session: Session, blobs: BlobStore, task: Task, snapshot_id: str) -> str:
    """Write the task's snapshot and return its key prefix."""
    labels = session.scalars(
        select(Label)
        .join(TaskLabel, TaskLabel.label_id == Label.id)
        .where(TaskLabel.task_id == task.id)
        .order_by(TaskLabel.created, Label.id)
    ).all()
    label_ids = [label.id for label in labels]
    links = session.execute(
        select(ImageLabel.image_id, ImageLabel.label_id, ImageLabel.value).where(
            ImageLabel.label_id.in_(label_ids)
        )
    ).all()
    per_image: dict[str, list[tuple[str, float | None]]] = defaultdict(list)
    for image_id, label_id, value in links:
        per_image[image_id].append((label_id, value))
    images = session.scalars(
        select(TrainingImage)
        .where(TrainingImage.id.in_(list(per_image)), TrainingImage.workspace_id == task.workspace_id)
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
    prefix = blob_layout.dataset_prefix(task.id, snapshot_id)
    write_snapshot(blobs, prefix, info, rows)
    return prefix
