"""/recognition/v2/task: tasks, their labels, and which model version is in production."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from api.db.models import Label, Model, Task, TaskLabel, TrainStatus, User
from api.deps import (
    BlobsDep,
    BodyDep,
    ClassifierDep,
    CurrentUser,
    ServicesDep,
    SessionDep,
    SettingsDep,
    TrainingDep,
    check_body_workspace,
)
from api.http.body import parse
from api.http.pagination import paginate
from api.http.routing import SlashAgnosticRouter
from api.presenters import run_public, task_public
from api.schemas._all import LabelIdBody, TaskCreate, TaskUpdate, TrainRequest
from api.services.container import Services
from api.services.lookups import get_label, get_task
from taskvision import blob_layout
from taskvision.errors import BadRequestError, ConflictError
from taskvision.task_types import LABEL_TYPE_FOR_TASK, LabelType, TaskType, label_fits_task

logger = logging.getLogger(__name__)

router = SlashAgnosticRouter(prefix="/recognition/v2/task", tags=["tasks"])


@router.get("/")
def list_tasks(request: Request, session: SessionDep, user: CurrentUser, settings: SettingsDep) -> Any:
    stmt = (
        select(Task)
        .options(selectinload(Task.labels))
        .where(Task.workspace_id == user.workspace_id)
        .order_by(Task.created, Task.id)
    )
    return paginate(
        session,
        stmt,
        request=request,
        settings=settings,
        serialize=lambda rows: [task_public(t) for t in rows],
    )


@router.post("/", status_code=201)
def create_task(session: SessionDep, user: CurrentUser, body: BodyDep) -> Any:
    check_body_workspace(user, body)
    data = parse(TaskCreate, body)
    task = Task(workspace_id=user.workspace_id, name=data.name, type=data.type, description=data.description)
    session.add(task)
    session.flush()
    if data.type is TaskType.MULTI_LABEL:
        # A tagging task predicts "none of the tags" through its negative label.
        negative = Label(
            workspace_id=user.workspace_id,
            name=f"{data.name} (negative)",
            type=LabelType.TAG,
            description=f"Negative label of task {data.name}: images with none of its tags.",
            output_name="negative",
            negative_for_task=task.id,
        )
        session.add(negative)
        session.flush()
        session.add(TaskLabel(task_id=task.id, label_id=negative.id))
    session.commit()
    session.refresh(task)
    return task_public(task)


@router.get("/{task_id}")
def get_task_detail(task_id: str, session: SessionDep, user: CurrentUser) -> Any:
    return task_public(get_task(session, user, task_id))


def _update(task_id: str, services: Services, session: Session, user: User, body: dict[str, Any]) -> Any:
    check_body_workspace(user, body)
    data = parse(TaskUpdate, body)
    task = get_task(session, user, task_id, for_update=True)
    if data.name is not None:
        task.name = data.name
    if data.description is not None:
        task.description = data.description
    if "canary_percent" in data.model_fields_set:
        task.canary_percent = data.canary_percent
    if data.production_version is not None and data.production_version != task.production_version:
        model = session.scalar(
            select(Model).where(Model.task_id == task.id, Model.version == data.production_version)
        )
        if model is None or model.train_status != TrainStatus.TRAINED:
            raise BadRequestError(
                f"Task {task.id} has no trained version {data.production_version}.", code="unknown_version"
            )
        task.production_version = data.production_version
    session.commit()
    session.refresh(task)
    services.jobs.wake()  # a new production version or canary share: the reconciler acts now
    return task_public(task)


@router.patch("/{task_id}")
def patch_task(
    task_id: str, services: ServicesDep, session: SessionDep, user: CurrentUser, body: BodyDep
) -> Any:
    return _update(task_id, services, session, user, body)


@router.put("/{task_id}")
def put_task(
    task_id: str, services: ServicesDep, session: SessionDep, user: CurrentUser, body: BodyDep
) -> Any:
    return _update(task_id, services, session, user, body)


@router.delete("/{task_id}", status_code=204)
def delete_task(
    task_id: str,
    session: SessionDep,
    user: CurrentUser,
    blobs: BlobsDep,
    training: TrainingDep,
    classifier: ClassifierDep,
) -> Response:
    """Delete the task with its negative label, label links, models, runs, snapshots and bundles."""
    task = get_task(session, user, task_id)
    training.cancel_task_runs(session, task.id)
    classifier.unload_task(task.id)  # cluster mode: its InferenceService goes too
    session.delete(task)  # FK cascades: negative label, label links, models, runs
    session.commit()
    for prefix in blob_layout.task_prefixes(task.id):
        try:
            blobs.delete_prefix(prefix)
        except Exception:
            logger.warning("could not delete %s of task %s", prefix, task.id, exc_info=True)
    return Response(status_code=204)


@router.post("/{task_id}/train", status_code=202)
def train_task(
    task_id: str, session: SessionDep, user: CurrentUser, body: BodyDep, training: TrainingDep
) -> Any:
    """Start a training (answers at once). Optional body: training parameters (``TrainRequest``)."""
    check_body_workspace(user, body)
    data = parse(TrainRequest, body)
    task = get_task(session, user, task_id, for_update=True)
    params = data.model_dump(exclude_none=True)
    run = training.request_training(session, user, task, params)
    return {**run_public(run), "task_status": task.last_train_status}


@router.post("/{task_id}/add-label")
def add_label(task_id: str, session: SessionDep, user: CurrentUser, body: BodyDep) -> Any:
    check_body_workspace(user, body)
    data = parse(LabelIdBody, body)
    task = get_task(session, user, task_id)
    label = get_label(session, user, data.label_id)
    task_type, label_type = TaskType(task.type), LabelType(label.type)
    if not label_fits_task(label_type, task_type):
        raise BadRequestError(
            f"A {task_type} task takes {LABEL_TYPE_FOR_TASK[task_type]} labels; "
            f"label '{label.name}' is a {label_type}.",
            code="label_type_mismatch",
        )
    if label.negative_for_task is not None and label.negative_for_task != task.id:
        raise BadRequestError("A negative label belongs to its own task only.", code="negative_label")
    exists = session.get(TaskLabel, (task.id, label.id))
    if exists is None:
        session.add(TaskLabel(task_id=task.id, label_id=label.id))
        session.commit()
        session.refresh(task)
    return task_public(task)


@router.post("/{task_id}/remove-label")
def remove_label(task_id: str, session: SessionDep, user: CurrentUser, body: BodyDep) -> Any:
    check_body_workspace(user, body)
    data = parse(LabelIdBody, body)
    task = get_task(session, user, task_id)
    label = get_label(session, user, data.label_id)
    if label.negative_for_task == task.id:
        raise ConflictError("The negative label of a tagging task cannot be removed from it.")
    link = session.get(TaskLabel, (task.id, label.id))
    if link is not None:
        session.delete(link)
        session.commit()
        session.refresh(task)
    return task_public(task)
