"""/recognition/v2/task: tasks, their labels, which model version is in production, and training."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from api.db.models import Label, Model, Task, TaskLabel, TrainStatus, User
from api.deps import (
    BlobsDep,
    ClassifierDep,
    CurrentUser,
    ImageIdPath,
    ServicesDep,
    SessionDep,
    TaskIdPath,
    TrainingDep,
    body_of,
)
from api.http.openapi import COMMON, errors
from api.http.pagination import PageDep, paginate, paginate_list, paginate_rows
from api.http.routing import SlashAgnosticRouter
from api.presenters import image_public, runs_public, task_public
from api.schemas.common import Page
from api.schemas.images import ImagePublic, ReviewDecision, ReviewItem
from api.schemas.tasks import LabelIdBody, TaskCreate, TaskPublic, TaskUpdate, TrainAccepted, TrainRequest
from api.services import review
from api.services.container import Services
from api.services.lookups import get_image, get_label, get_task
from api.services.task_labels import attach_label, detach_label
from api.services.versions import set_production
from taskvision import blob_layout
from taskvision.errors import BadRequestError
from taskvision.task_types import LabelType, TaskType

logger = logging.getLogger(__name__)

router = SlashAgnosticRouter(prefix="/recognition/v2/task", tags=["tasks"], responses=errors(*COMMON))

TaskCreateBody = Annotated[TaskCreate, body_of(TaskCreate, form=True)]
TaskUpdateBody = Annotated[TaskUpdate, body_of(TaskUpdate, form=True, required=False)]
LabelIdBodyDep = Annotated[LabelIdBody, body_of(LabelIdBody, form=True)]
TrainBody = Annotated[TrainRequest, body_of(TrainRequest, required=False)]
ReviewBody = Annotated[ReviewDecision, body_of(ReviewDecision, required=False)]


@router.get("/", response_model=Page[TaskPublic])
def list_tasks(request: Request, session: SessionDep, user: CurrentUser, page: PageDep) -> Any:
    """The workspace's tasks, oldest first."""
    stmt = (
        select(Task)
        .options(selectinload(Task.labels))
        .where(Task.workspace_id == user.workspace_id)
        .order_by(Task.created, Task.id)
    )
    return paginate(
        session, stmt, request=request, page=page, serialize=lambda rows: [task_public(t) for t in rows]
    )


@router.post("/", status_code=201, response_model=TaskPublic)
def create_task(session: SessionDep, user: CurrentUser, data: TaskCreateBody) -> Any:
    """Create a task. A tagging (multi_label) task gets its negative label ("none of the tags")."""
    task = Task(workspace_id=user.workspace_id, name=data.name, type=data.type, description=data.description)
    session.add(task)
    session.flush()
    if data.type is TaskType.MULTI_LABEL:
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


@router.get("/{task_id}", response_model=TaskPublic)
def get_task_detail(task_id: TaskIdPath, session: SessionDep, user: CurrentUser) -> Any:
    return task_public(get_task(session, user, task_id))


def _update(task_id: str, services: Services, session: Session, user: User, data: TaskUpdate) -> Any:
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
        set_production(session, task, data.production_version)
    session.commit()
    session.refresh(task)
    services.jobs.wake()  # a new production version or canary share: the reconciler acts now
    return task_public(task)


@router.patch("/{task_id}", response_model=TaskPublic)
def patch_task(
    task_id: TaskIdPath, services: ServicesDep, session: SessionDep, user: CurrentUser, data: TaskUpdateBody
) -> Any:
    """Rename, describe, or switch the production version (and, in cluster mode, its canary share)."""
    return _update(task_id, services, session, user, data)


@router.put("/{task_id}", response_model=TaskPublic)
def put_task(
    task_id: TaskIdPath, services: ServicesDep, session: SessionDep, user: CurrentUser, data: TaskUpdateBody
) -> Any:
    """The same as PATCH (fields left out stay as they are)."""
    return _update(task_id, services, session, user, data)


@router.delete("/{task_id}", status_code=204, response_class=Response, responses=errors(401, 404, 429))
def delete_task(
    task_id: TaskIdPath,
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


@router.post("/{task_id}/train", status_code=202, response_model=TrainAccepted, responses=errors(409))
def train_task(
    task_id: TaskIdPath, session: SessionDep, user: CurrentUser, data: TrainBody, training: TrainingDep
) -> Any:
    """Start a training; answers at once with the queued run (follow it at /training-run/{id})."""
    task = get_task(session, user, task_id, for_update=True)
    run = training.request_training(session, user, task, data.parameters())
    return {**runs_public(session, [run])[0], "task_status": task.last_train_status}


@router.post("/{task_id}/add-label", response_model=TaskPublic)
def add_label(task_id: TaskIdPath, session: SessionDep, user: CurrentUser, data: LabelIdBodyDep) -> Any:
    """Make the task predict this label (a category, tag or value label, by the task's type)."""
    task = get_task(session, user, task_id)
    attach_label(session, task, get_label(session, user, data.label_id, referenced=True))
    return task_public(task)


@router.post("/{task_id}/remove-label", response_model=TaskPublic, responses=errors(409))
def remove_label(task_id: TaskIdPath, session: SessionDep, user: CurrentUser, data: LabelIdBodyDep) -> Any:
    """Stop the task predicting this label (its images keep it)."""
    task = get_task(session, user, task_id)
    detach_label(session, task, get_label(session, user, data.label_id, referenced=True))
    return task_public(task)


@router.get("/{task_id}/review", response_model=Page[ReviewItem])
def review_queue(
    task_id: TaskIdPath,
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    blobs: BlobsDep,
    page: PageDep,
    kind: Annotated[
        Literal["uncertain", "disagreement"],
        Query(
            description="uncertain: stored, unlabelled images, the most uncertain first; disagreement: "
            "labelled images the model answers differently (likely label errors), the most confident first."
        ),
    ] = "uncertain",
) -> Any:
    """The review queue: images classify stored for this task (``store_images``) that have none of its
    labels yet, the most uncertain first, with the model's suggestion; or (``kind=disagreement``) the
    task's labelled images that its model disagrees with."""
    task = get_task(session, user, task_id)
    task_type = TaskType(task.type)
    if kind == "disagreement":
        model, found = review.likely_label_errors(session, blobs, task)

        def disagreeing(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
            if model is None:  # nothing trained yet: nothing to disagree with
                return []
            images = review.images_by_id(session, task.workspace_id, [image_id for image_id, _ in rows])
            return [
                ReviewItem(
                    kind="disagreement",
                    image=ImagePublic.model_validate(image_public(images[image_id], request)),
                    version=model.version,
                    suggested=record.get("predicted_labels") or [],
                    labels=record.get("scores") or record.get("predicted_labels") or [],
                    uncertainty=None
                    if record.get("confidence") is None
                    else 1.0 - float(record["confidence"]),
                    true_labels=record.get("true_labels") or [],
                    split=record.get("split"),
                    error=record.get("error"),
                    predicted=model.created,
                ).model_dump(mode="json")
                for image_id, record in rows
                if image_id in images
            ]

        return paginate_list(found, request=request, page=page, serialize=disagreeing)

    def items(rows: Sequence[Any]) -> list[dict[str, Any]]:
        return [
            ReviewItem(
                image=ImagePublic.model_validate(image_public(image, request)),
                version=prediction.version,
                suggested=review.suggestion(task_type, prediction.answer),
                labels=prediction.answer.get("labels") or [],
                uncertainty=prediction.uncertainty,
                predicted=prediction.created,
            ).model_dump(mode="json")
            for image, prediction in rows
        ]

    return paginate_rows(session, review.uncertain_images(task), request=request, page=page, serialize=items)


@router.post("/{task_id}/review/{image_id}", response_model=ImagePublic)
def review_image(
    task_id: TaskIdPath,
    image_id: ImageIdPath,
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    blobs: BlobsDep,
    data: ReviewBody,
) -> Any:
    """Label a queued image in one call: the suggestion (an empty body), or the labels/value given.

    For an image of the disagreement list, the suggestion is the model's answer in its evaluation."""
    task = get_task(session, user, task_id)
    image = get_image(session, user, image_id)
    review.apply_review(
        session,
        task,
        image,
        label_ids=data.label_ids,
        value=data.value,
        evaluated=lambda: review.evaluated_answer(session, blobs, task, image.id),
    )
    return image_public(get_image(session, user, image_id), request)
