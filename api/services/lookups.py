"""Fetch a user's object by id, or raise NotFoundError. Another workspace's object is "not found" too.

An id in the URL names the resource: missing is a 404. An id in a request body
only refers to another object (``referenced=True``): missing is a 400 that
names the field, as DRF answers an unknown primary key.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from api.db.models import Label, Model, Task, TrainingImage, User
from taskvision.errors import BadRequestError, NotFoundError


def _missing(what: str, object_id: str, referenced: bool) -> Exception:
    if referenced:
        return BadRequestError(
            f"{what} {object_id} not found.", code=f"unknown_{what.lower().replace(' ', '_')}"
        )
    return NotFoundError(f"{what} {object_id} not found.")


def get_task(
    session: Session, user: User, task_id: str, *, for_update: bool = False, referenced: bool = False
) -> Task:
    stmt = select(Task).where(Task.id == str(task_id), Task.workspace_id == user.workspace_id)
    if for_update:
        stmt = stmt.with_for_update()
    task = session.scalar(stmt)
    if task is None:
        raise _missing("Task", task_id, referenced)
    return task


def get_label(session: Session, user: User, label_id: str, *, referenced: bool = False) -> Label:
    label = session.scalar(
        select(Label).where(Label.id == str(label_id), Label.workspace_id == user.workspace_id)
    )
    if label is None:
        raise _missing("Label", label_id, referenced)
    return label


def get_image(session: Session, user: User, image_id: str) -> TrainingImage:
    image = session.scalar(
        select(TrainingImage)
        .options(selectinload(TrainingImage.label_links))
        .where(TrainingImage.id == str(image_id), TrainingImage.workspace_id == user.workspace_id)
    )
    if image is None:
        raise NotFoundError(f"Training image {image_id} not found.")
    return image


def get_model(session: Session, user: User, model_id: str) -> Model:
    model = session.scalar(
        select(Model).where(Model.id == str(model_id), Model.workspace_id == user.workspace_id)
    )
    if model is None:
        raise NotFoundError(f"Model {model_id} not found.")
    return model
