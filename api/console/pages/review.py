"""The review queue: one image at a time with the model's suggestion; accept, correct or skip (keys too).

Two lists, from :mod:`api.services.review` as the REST API serves them:

* ``uncertain``: images classify stored (``store_images``) that have none of the
  task's labels yet, the most uncertain first;
* ``disagreement``: the task's labelled images its model answers differently in its
  evaluation (likely label errors), the most confident disagreement first.

Accepting labels the image with the suggestion, correcting with the labels (or
value) chosen; both go through the REST route's own function. A decided image
leaves the list, so the page stays at the same position; skip moves on. When
images were labelled since the last training started, a "Retrain now" button
queues a training with the default options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.console import actions, queries
from api.console.deps import CsrfChecked, ViewerDep
from api.console.pages.common import act, form_fields, form_list, load_task, task_context, task_url
from api.console.pages.training import queue_training
from api.console.rendering import render
from api.db.models import ImageLabel, Model, RunStatus, Task, TaskLabel, TrainingImage, TrainingRun
from api.deps import ServicesDep, SessionDep
from api.schemas.common import ID_PATTERN
from api.services import review
from taskvision.errors import NotFoundError
from taskvision.task_types import TaskType

router = APIRouter()

Kind = Literal["uncertain", "disagreement"]
KINDS: dict[str, str] = {
    "uncertain": "Stored by classify, unlabelled",
    "disagreement": "Labelled, but the model disagrees",
}
MAX_AT = 100_000
UP_NEXT = 8


@dataclass(frozen=True)
class ReviewCard:
    """The image under review with what the model said about it."""

    image: TrainingImage
    version: int
    suggested: list[dict[str, Any]]  # {id, name, prob} or, regression, {id, name, value}
    scores: list[dict[str, Any]]  # every label's probability (regression: the values)
    uncertainty: float | None
    true_labels: list[dict[str, Any]]  # disagreement: the labels it carries

    @property
    def file_name(self) -> str:
        meta = self.image.meta_data or {}
        return str(meta.get("file_name") or f"Image {self.image.id[:8]}")


@dataclass(frozen=True)
class Queue:
    kind: str
    total: int
    at: int
    card: ReviewCard | None
    up_next: list[TrainingImage]


def _uncertain(session: Session, task: Task, at: int) -> Queue:
    stmt = review.uncertain_images(task)
    total = int(session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0)
    at = min(at, max(0, total - 1))
    rows = session.execute(stmt.offset(at).limit(UP_NEXT + 1)).all()
    task_type = TaskType(task.type)
    card = None
    if rows:
        image, prediction = rows[0]
        card = ReviewCard(
            image=image,
            version=prediction.version,
            suggested=review.suggestion(task_type, prediction.answer),
            scores=list(prediction.answer.get("labels") or []),
            uncertainty=prediction.uncertainty,
            true_labels=[],
        )
    return Queue("uncertain", total, at, card, [row[0] for row in rows[1:]])


def _disagreement(session: Session, blobs: Any, task: Task, at: int) -> Queue:
    model, found = review.likely_label_errors(session, blobs, task)
    total = len(found)
    at = min(at, max(0, total - 1))
    card = None
    shown = found[at : at + 1 + UP_NEXT]
    images = review.images_by_id(session, task.workspace_id, [image_id for image_id, _ in shown])
    if shown and model is not None and shown[0][0] in images:
        image_id, record = shown[0]
        confidence = record.get("confidence")
        card = ReviewCard(
            image=images[image_id],
            version=model.version,
            suggested=list(record.get("predicted_labels") or []),
            scores=list(record.get("scores") or record.get("predicted_labels") or []),
            uncertainty=None if confidence is None else 1.0 - float(confidence),
            true_labels=list(record.get("true_labels") or []),
        )
    up_next = [images[image_id] for image_id, _ in shown[1:] if image_id in images]
    return Queue("disagreement", total, at, card, up_next)


def labelled_since_training(session: Session, task: Task) -> int:
    """Images that got one of the task's labels after its latest training was requested (or, for a task
    never trained here, after its first version was imported)."""
    latest = session.scalar(select(func.max(TrainingRun.created)).where(TrainingRun.task_id == task.id))
    if latest is None:  # never trained here: since its first version was imported, if any
        latest = session.scalar(select(func.min(Model.created)).where(Model.task_id == task.id))
    if latest is None:
        return 0
    return int(
        session.scalar(
            select(func.count(func.distinct(ImageLabel.image_id))).where(
                ImageLabel.label_id.in_(select(TaskLabel.label_id).where(TaskLabel.task_id == task.id)),
                ImageLabel.created > latest,
            )
        )
        or 0
    )


def _training_now(session: Session, task: Task) -> bool:
    active = select(TrainingRun.id).where(
        TrainingRun.task_id == task.id, TrainingRun.status.in_(RunStatus.active())
    )
    return session.scalar(active.limit(1)) is not None


def review_url(task: Task, kind: str, at: int = 0) -> str:
    params: dict[str, Any] = {"kind": kind}
    if at:
        params["at"] = at
    return task_url(task, "/review") + "?" + urlencode(params)


@router.get("/tasks/{task_id}/review")
def review_page(
    request: Request,
    task_id: str,
    session: SessionDep,
    services: ServicesDep,
    viewer: ViewerDep,
    kind: Annotated[str, Query(max_length=32)] = "uncertain",
    at: Annotated[int, Query(ge=0, le=MAX_AT)] = 0,
) -> Response:
    task = load_task(session, viewer, task_id)
    kind = kind if kind in KINDS else "uncertain"
    queue = (
        _disagreement(session, services.blobs, task, at)
        if kind == "disagreement"
        else _uncertain(session, task, at)
    )
    labels = sorted(task.labels, key=lambda lb: lb.negative_for_task == task.id)
    return render(
        request,
        "review.html",
        {
            **task_context(task, "review"),
            "queue": queue,
            "kinds": [(name, title, review_url(task, name)) for name, title in KINDS.items()],
            "labels": [lb for lb in labels if lb.negative_for_task != task.id],
            "skip_url": review_url(task, kind, queue.at + 1) if queue.at + 1 < queue.total else None,
            "back_url": review_url(task, kind, queue.at - 1) if queue.at > 0 else None,
            "here": review_url(task, kind, queue.at),
            "labelled": labelled_since_training(session, task),
            "training_now": _training_now(session, task),
            "has_version": task.production_version is not None or bool(queries.versions(session, task)),
        },
        viewer=viewer,
    )


@router.post("/tasks/{task_id}/review/retrain", dependencies=[CsrfChecked])
async def retrain(
    request: Request, task_id: str, session: SessionDep, services: ServicesDep, viewer: ViewerDep
) -> Response:
    """Queue a training with the default options (the train page follows it)."""
    task = load_task(session, viewer, task_id)
    return queue_training(request, session, services.settings, viewer, task, {})


@router.post("/tasks/{task_id}/review/{image_id}", dependencies=[CsrfChecked])
async def decide(
    request: Request,
    task_id: str,
    image_id: str,
    session: SessionDep,
    services: ServicesDep,
    viewer: ViewerDep,
) -> Response:
    """Accept the suggestion or set the labels (value) chosen; back to the same place of the list."""
    task = load_task(session, viewer, task_id)
    if not re.fullmatch(ID_PATTERN, image_id):
        raise NotFoundError(f"Training image {image_id} not found.")
    form = await form_fields(request)
    chosen = await form_list(request, "label_ids")
    kind = str(form.get("kind", "uncertain"))
    kind = kind if kind in KINDS else "uncertain"
    raw_at = str(form.get("at", "0"))
    at = min(int(raw_at), MAX_AT) if raw_at.isascii() and raw_at.isdigit() else 0
    decision = str(form.get("decision", "accept"))

    def run() -> str:
        names = {lb.id: lb.name for lb in task.labels}
        if decision == "accept":
            actions.review(request, session, services, viewer.user, task.id, image_id, {})
            return "Suggestion accepted."
        if task.type == TaskType.REGRESSION:
            actions.review(
                request, session, services, viewer.user, task.id, image_id, {"value": form.get("value")}
            )
            return "Value saved."
        actions.review(request, session, services, viewer.user, task.id, image_id, {"label_ids": chosen})
        shown = ", ".join(f"'{names.get(i, i)}'" for i in chosen) or "none of the tags"
        return f"Labelled {shown}."

    return act(request, session, review_url(task, kind, at), run)
