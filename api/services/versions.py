"""Model versions: the one way a bundle becomes a task's next version, from a run or an import.

:func:`register_version` is called by the run watcher when a training
succeeds and by :func:`import_bundle` for an externally trained bundle
(``dvc repro``'s export, a notebook). The rules are the same for both: the
version is the task's highest plus one, and it goes to production when asked
to, or when the task has no production version yet.

An imported bundle is checked against the task first: the same task type, and
output labels that match the task's labels by name (their ids are rewritten to
the task's). It is then copied into the blob store like a pipeline-trained bundle.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.db.models import Label, Model, Task, TaskLabel, TrainStatus
from api.services import webhooks
from taskvision import blob_layout
from taskvision.bundle import BundleMeta
from taskvision.errors import BadRequestError
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType


def next_version(session: Session, task_id: str) -> int:
    """The task's next model version: the highest so far plus one (1 for the first)."""
    return (session.scalar(select(func.max(Model.version)).where(Model.task_id == task_id)) or 0) + 1


def register_version(
    session: Session,
    task: Task,
    *,
    bundle_uri: str,
    metrics: dict[str, Any],
    production: bool,
    run_id: str | None = None,
) -> Model:
    """Add the bundle at ``bundle_uri`` as ``task``'s next version (not committed).

    It becomes the production version when ``production`` is true or the task has none yet.
    """
    model = Model(
        workspace_id=task.workspace_id,
        task_id=task.id,
        version=next_version(session, task.id),
        train_status=TrainStatus.TRAINED,
        metrics=metrics,
        bundle_uri=bundle_uri,
        run_id=run_id,
    )
    session.add(model)
    if production or task.production_version < 1:
        set_production(session, task, model.version)
    task.last_train_status, task.last_train_error = TrainStatus.TRAINED, ""
    return model


def set_production(session: Session, task: Task, version: int) -> None:
    """Make ``version`` the task's production version (not committed); webhooks are told."""
    previous = task.production_version
    if previous == version:
        return
    task.production_version = version
    webhooks.emit(
        session,
        task.workspace_id,
        "version.production_changed",
        {
            "task": {"id": task.id, "name": task.name},
            "production_version": version,
            "previous_version": previous if previous > 0 else None,
        },
    )


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

    prefix = blob_layout.bundle_prefix(task.id, f"imported-{uuid.uuid4()}")
    blobs.put(f"{prefix}/{meta.weights_file}", weights.read_bytes())
    blobs.put(f"{prefix}/bundle.json", meta.to_json().encode(), content_type="application/json")
    model = register_version(session, task, bundle_uri=prefix, metrics=meta.metrics, production=production)
    session.commit()
    return model
