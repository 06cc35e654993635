"""Every change a console page makes, done by the same code the REST API runs.

Where a rule lives in a REST route's function (the negative label of a new
tagging task, what a task deletion cancels and removes, the production switch,
bulk label edits), the console calls that function in-process with a typed
body, so the rules are written once and whatever the route gains later
(checks, webhooks) applies to the console too. Where a service exists
(``api.services.ingest``), the console calls the service. Form input is
validated into the API's own request schemas with :func:`api.http.body.parse`,
so a page refuses exactly what the API refuses, with the same words.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session

from api.db.models import Label, Task, User
from api.http.body import parse
from api.routes import classify as classify_route
from api.routes import labels as label_routes
from api.routes import tasks as task_routes
from api.routes import training_images as image_routes
from api.schemas.classify import ClassifyRequest
from api.schemas.images import BulkImageUpdate, ImageLabelBody, ReviewDecision
from api.schemas.labels import LabelCreate, LabelUpdate
from api.schemas.tasks import LabelIdBody, TaskCreate, TaskUpdate, TrainRequest
from api.services.container import Services
from taskvision.errors import BadRequestError
from taskvision.task_types import LABEL_TYPE_FOR_TASK, TaskType

logger = logging.getLogger(__name__)


def create_task(session: Session, user: User, form: Mapping[str, Any]) -> str:
    """A new task from the create form; returns its id."""
    data = parse(TaskCreate, dict(form), form=True)
    created = task_routes.create_task(session=session, user=user, data=data)
    return str(created["id"])


def delete_task(services: Services, session: Session, user: User, task_id: str) -> None:
    task_routes.delete_task(
        task_id=task_id,
        session=session,
        user=user,
        blobs=services.blobs,
        training=services.training,
        classifier=services.classifier,
    )


def update_task(
    services: Services, session: Session, user: User, task_id: str, fields: dict[str, Any]
) -> None:
    """Rename/describe the task, switch its production version or set the canary share."""
    data = parse(TaskUpdate, fields)
    task_routes.patch_task(task_id=task_id, services=services, session=session, user=user, data=data)


def create_label(session: Session, user: User, task: Task, form: Mapping[str, Any]) -> str:
    """A new label of the type the task takes, attached to it; returns its id."""
    fields = {key: form[key] for key in ("name", "description") if key in form}
    fields["type"] = LABEL_TYPE_FOR_TASK[TaskType(task.type)].value
    data = parse(LabelCreate, fields, form=True)
    label = label_routes.create_label(session=session, user=user, data=data)
    attach_label(session, user, task, str(label["id"]))
    return str(label["id"])


def attach_label(session: Session, user: User, task: Task, label_id: str) -> None:
    data = parse(LabelIdBody, {"label_id": label_id}, form=True)
    task_routes.add_label(task_id=task.id, session=session, user=user, data=data)


def detach_label(session: Session, user: User, task: Task, label_id: str) -> None:
    data = parse(LabelIdBody, {"label_id": label_id}, form=True)
    task_routes.remove_label(task_id=task.id, session=session, user=user, data=data)


def rename_label(session: Session, user: User, label_id: str, form: Mapping[str, Any]) -> None:
    data = parse(LabelUpdate, {"name": form.get("name", "")}, form=True)
    label_routes.patch_label(label_id=label_id, session=session, user=user, data=data)


def train(session: Session, services: Services, user: User, task_id: str, params: dict[str, Any]) -> str:
    """Queue a training with these options (already typed); returns the run's id."""
    data = parse(TrainRequest, params)
    run = task_routes.train_task(
        task_id=task_id, session=session, user=user, data=data, training=services.training
    )
    return str(run["id"])


def review(
    request: Request,
    session: Session,
    services: Services,
    user: User,
    task_id: str,
    image_id: str,
    fields: dict[str, Any],
) -> None:
    """Label a reviewed image: the suggestion (no fields), or ``label_ids`` / ``value`` instead."""
    if "value" in fields and (fields["value"] is None or str(fields["value"]).strip() == ""):
        raise BadRequestError("Enter a number.", code="value_required")
    data = parse(ReviewDecision, fields, form=True)
    task_routes.review_image(
        task_id=task_id,
        image_id=image_id,
        request=request,
        session=session,
        user=user,
        blobs=services.blobs,
        data=data,
    )


def _bulk(session: Session, user: User, **fields: Any) -> int:
    data = parse(BulkImageUpdate, fields)
    return int(image_routes.bulk_update(session=session, user=user, data=data)["updated"])


def set_label(session: Session, user: User, task: Task, image_ids: list[str], label: Label) -> int:
    """Give the images ``label``, keeping what the task type allows.

    Categorization: the image's other categories of this task go (one category per
    image). Tagging: a tag takes away the negative label, and the negative label takes
    away every tag. Returns how many images were changed.
    """
    others = [lb.id for lb in task.labels if lb.id != label.id]
    remove: list[str] = []
    if task.type == TaskType.MULTI_CLASS:
        remove = others
    elif task.type == TaskType.MULTI_LABEL:
        negative = [lb.id for lb in task.labels if lb.negative_for_task == task.id]
        remove = others if label.id in negative else negative
    return _bulk(session, user, images=image_ids, labels_add=[label.id], labels_remove=remove)


def remove_label(session: Session, user: User, image_ids: list[str], label_id: str) -> int:
    return _bulk(session, user, images=image_ids, labels_remove=[label_id])


def mark_test(session: Session, user: User, image_ids: list[str], test: bool) -> int:
    return _bulk(session, user, images=image_ids, mark_test=test, unmark_test=not test)


def set_value(
    request: Request, session: Session, user: User, image_ids: Iterable[str], label_id: str, value: Any
) -> int:
    """Set a regression value on each image (the value label is added where it is missing)."""
    data = parse(ImageLabelBody, {"label_id": label_id, "value": value}, form=True)
    if data.value is None:
        raise BadRequestError("Enter a number.", code="value_required")
    count = 0
    for image_id in image_ids:
        image_routes.add_label(image_id=image_id, request=request, session=session, user=user, data=data)
        count += 1
    return count


def delete_images(session: Session, user: User, image_ids: Iterable[str]) -> int:
    count = 0
    for image_id in image_ids:
        image_routes.delete_image(image_id=image_id, session=session, user=user)
        count += 1
    return count


async def classify(
    services: Services,
    session: Session,
    user: User,
    task_id: str,
    version: int | None,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Classify one record (``_base64`` or ``_url``) as ``POST /v2/classify`` would; the Ximilar answer."""
    data = parse(ClassifyRequest, {"task_id": task_id, "version": version, "records": [record]})
    answer: dict[str, Any] = await classify_route.classify(
        session=session,
        user=user,
        data=data,
        settings=services.settings,
        blobs=services.blobs,
        classifier=services.classifier,
        slots=services.classify_slots,
        fetch_slots=services.fetch_slots,
    )
    return answer
