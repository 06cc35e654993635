"""Register an externally trained model bundle (``dvc repro``'s export, a notebook) as a task version.

The bundle is checked against the task first: the same task type, and output
labels that match the task's labels by name (their ids are rewritten to the
task's). It is then copied into the blob store like a pipeline-trained bundle
and becomes the next version (max + 1).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.db.models import Label, Model, Task, TaskLabel
from taskvision.bundle import BundleMeta
from taskvision.errors import BadRequestError
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType


def next_version(session: Session, task_id: str) -> int:
    """The task's next model version: the highest so far plus one (1 for the first)."""
    return (session.scalar(select(func.max(Model.version)).where(Model.task_id == task_id)) or 0) + 1


def import_bundle(
    session: Session, blobs: BlobStore, task: Task, bundle_dir: Path, *, production: bool
) -> Model:
    """Check ``bundle_dir`` against ``task``, store it, and commit it as the task's next version."""
    try:
        meta = BundleMeta.from_json((bundle_dir / "bundle.json").read_text())
    except (OSError, ValueError, TypeError) as exc:
        raise BadRequestError(f"{bundle_dir} is not a model bundle: {exc}") from exc
    weights = bundle_dir / meta.weights_file
    if not weights.is_file():
        raise BadRequestError(f"The bundle has no {meta.weights_file}.")
    if meta.task_type != TaskType(task.type):
        raise BadRequestError(f"The bundle is a {meta.task_type} model; task '{task.name}' is {task.type}.")
    labels = session.scalars(
        select(Label).join(TaskLabel, TaskLabel.label_id == Label.id).where(TaskLabel.task_id == task.id)
    ).all()
    outputs = {label.name: label for label in labels if label.negative_for_task != task.id}
    names = [label["name"] for label in meta.labels]
    if sorted(names) != sorted(outputs):
        raise BadRequestError(
            f"The bundle predicts labels {sorted(names)}; task '{task.name}' has {sorted(outputs)}."
        )
    meta.labels = [{"id": outputs[name].id, "name": name} for name in names]
    negative = next((label for label in labels if label.negative_for_task == task.id), None)
    meta.negative_label = {"id": negative.id, "name": negative.name} if negative else None
    meta.task_id = task.id

    prefix = f"models/{task.id}/imported-{uuid.uuid4()}"
    blobs.put(f"{prefix}/{meta.weights_file}", weights.read_bytes())
    blobs.put(f"{prefix}/bundle.json", meta.to_json().encode(), content_type="application/json")
    version = next_version(session, task.id)
    model = Model(
        workspace_id=task.workspace_id,
        task_id=task.id,
        version=version,
        train_status="TRAINED",
        metrics=meta.metrics,
        bundle_uri=prefix,
    )
    session.add(model)
    if production or task.production_version < 1:
        task.production_version = version
    task.last_train_status = "TRAINED"
    session.commit()
    return model
