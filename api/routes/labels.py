"""/recognition/v2/label: labels (category / tag / value), shared by tasks and images."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request, Response
from sqlalchemy import delete, select

from api.db.models import ImageLabel, Label, TaskLabel
from api.deps import CurrentUser, LabelIdPath, SessionDep, body_of
from api.http.openapi import COMMON, errors
from api.http.pagination import PageDep, paginate
from api.http.routing import SlashAgnosticRouter
from api.presenters import labels_public
from api.schemas.common import ID_PATTERN, NO_NUL, Page
from api.schemas.labels import LabelCreate, LabelPublic, LabelUpdate, LabelWiped, TaskIdBody
from api.services.lookups import get_label, get_task
from api.services.task_labels import attach_label, detach_label
from taskvision.errors import ConflictError

router = SlashAgnosticRouter(prefix="/recognition/v2/label", tags=["labels"], responses=errors(*COMMON))

LabelCreateBody = Annotated[LabelCreate, body_of(LabelCreate, form=True)]
LabelUpdateBody = Annotated[LabelUpdate, body_of(LabelUpdate, form=True, required=False)]
TaskIdBodyDep = Annotated[TaskIdBody, body_of(TaskIdBody, form=True)]


@router.get("/", response_model=Page[LabelPublic])
def list_labels(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    task: Annotated[str | None, Query(pattern=ID_PATTERN, description="Only this task's labels.")] = None,
    search: Annotated[
        str | None, Query(max_length=255, pattern=NO_NUL, description="Names containing this (any case).")
    ] = None,
) -> Any:
    """Labels of the workspace, oldest first."""
    stmt = select(Label).where(Label.workspace_id == user.workspace_id)
    if task:
        found = get_task(session, user, task)
        stmt = stmt.join(TaskLabel, TaskLabel.label_id == Label.id).where(TaskLabel.task_id == found.id)
    if search:
        # The docs' curl example quotes the term: ?search="rose"
        term = search.strip().strip('"').strip("'")
        escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(Label.name.ilike(f"%{escaped}%", escape="\\"))
    stmt = stmt.order_by(Label.created, Label.id)
    return paginate(
        session,
        stmt,
        request=request,
        page=page,
        serialize=lambda rows: labels_public(session, rows, with_counts=True),
    )


@router.post("/", status_code=201, response_model=LabelPublic)
def create_label(session: SessionDep, user: CurrentUser, data: LabelCreateBody) -> Any:
    label = Label(
        workspace_id=user.workspace_id,
        name=data.name,
        type=data.type,
        description=data.description,
        output_name=data.output_name,
    )
    session.add(label)
    session.commit()
    return labels_public(session, [label], with_counts=True)[0]


@router.get("/{label_id}", response_model=LabelPublic)
def get_label_detail(label_id: LabelIdPath, session: SessionDep, user: CurrentUser) -> Any:
    return labels_public(session, [get_label(session, user, label_id)], with_counts=True)[0]


def _update(label_id: str, session: SessionDep, user: CurrentUser, data: LabelUpdate) -> Any:
    label = get_label(session, user, label_id)
    for field in ("name", "description", "output_name"):
        value = getattr(data, field)
        if value is not None:
            setattr(label, field, value)
    session.commit()
    return labels_public(session, [label], with_counts=True)[0]


@router.patch("/{label_id}", response_model=LabelPublic)
def patch_label(label_id: LabelIdPath, session: SessionDep, user: CurrentUser, data: LabelUpdateBody) -> Any:
    """Rename or describe a label (fields left out stay as they are)."""
    return _update(label_id, session, user, data)


@router.put("/{label_id}", response_model=LabelPublic)
def put_label(label_id: LabelIdPath, session: SessionDep, user: CurrentUser, data: LabelUpdateBody) -> Any:
    return _update(label_id, session, user, data)


@router.delete("/{label_id}", status_code=204, response_class=Response, responses=errors(409))
def delete_label(label_id: LabelIdPath, session: SessionDep, user: CurrentUser) -> Response:
    """Delete a label: it is detached from every task and removed from every image."""
    label = get_label(session, user, label_id)
    if label.negative_for_task is not None:
        raise ConflictError("The negative label of a tagging task is deleted with its task, not alone.")
    session.delete(label)
    session.commit()
    return Response(status_code=204)


@router.delete("/{label_id}/wipe", response_model=LabelWiped)
def wipe_label(label_id: LabelIdPath, session: SessionDep, user: CurrentUser) -> Any:
    """Remove the label from all its images (the label itself stays)."""
    label = get_label(session, user, label_id)
    result = session.execute(delete(ImageLabel).where(ImageLabel.label_id == label.id))
    session.commit()
    removed = getattr(result, "rowcount", 0) or 0
    return {"id": label.id, "removed_from_images": removed}


@router.post("/{label_id}/add-task", response_model=LabelPublic)
def add_task(label_id: LabelIdPath, session: SessionDep, user: CurrentUser, data: TaskIdBodyDep) -> Any:
    """The label-side twin of ``POST /task/{id}/add-label``."""
    label = get_label(session, user, label_id)
    attach_label(session, get_task(session, user, data.task_id, referenced=True), label)
    return labels_public(session, [label], with_counts=True)[0]


@router.post("/{label_id}/remove-task", response_model=LabelPublic, responses=errors(409))
def remove_task(label_id: LabelIdPath, session: SessionDep, user: CurrentUser, data: TaskIdBodyDep) -> Any:
    label = get_label(session, user, label_id)
    detach_label(session, get_task(session, user, data.task_id, referenced=True), label)
    return labels_public(session, [label], with_counts=True)[0]
