"""/recognition/v2/label: labels (category / tag / value), shared by tasks and images."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from sqlalchemy import delete, select

from api.db.models import ImageLabel, Label, TaskLabel
from api.deps import BodyDep, CurrentUser, SessionDep, SettingsDep, check_body_workspace
from api.http.body import parse
from api.http.pagination import paginate
from api.http.routing import SlashAgnosticRouter
from api.presenters import labels_public
from api.routes import tasks as task_routes
from api.schemas._all import LabelCreate, LabelUpdate, TaskIdBody
from api.services.lookups import get_label, get_task
from taskvision.errors import ConflictError

router = SlashAgnosticRouter(prefix="/recognition/v2/label", tags=["labels"])


@router.get("/")
def list_labels(request: Request, session: SessionDep, user: CurrentUser, settings: SettingsDep) -> Any:
    """Labels of the workspace; ``?task=<id>`` keeps a task's labels, ``?search=`` matches names."""
    stmt = select(Label).where(Label.workspace_id == user.workspace_id)
    task_id = request.query_params.get("task")
    if task_id:
        task = get_task(session, user, task_id)
        stmt = stmt.join(TaskLabel, TaskLabel.label_id == Label.id).where(TaskLabel.task_id == task.id)
    search = request.query_params.get("search")
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
        settings=settings,
        serialize=lambda rows: labels_public(session, rows, with_counts=True),
    )


@router.post("/", status_code=201)
def create_label(session: SessionDep, user: CurrentUser, body: BodyDep) -> Any:
    check_body_workspace(user, body)
    data = parse(LabelCreate, body)
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


@router.get("/{label_id}")
def get_label_detail(label_id: str, session: SessionDep, user: CurrentUser) -> Any:
    return labels_public(session, [get_label(session, user, label_id)], with_counts=True)[0]


def _update(label_id: str, session: SessionDep, user: CurrentUser, body: dict[str, Any]) -> Any:
    check_body_workspace(user, body)
    data = parse(LabelUpdate, body)
    label = get_label(session, user, label_id)
    for field in ("name", "description", "output_name"):
        value = getattr(data, field)
        if value is not None:
            setattr(label, field, value)
    session.commit()
    return labels_public(session, [label], with_counts=True)[0]


@router.patch("/{label_id}")
def patch_label(label_id: str, session: SessionDep, user: CurrentUser, body: BodyDep) -> Any:
    return _update(label_id, session, user, body)


@router.put("/{label_id}")
def put_label(label_id: str, session: SessionDep, user: CurrentUser, body: BodyDep) -> Any:
    return _update(label_id, session, user, body)


@router.delete("/{label_id}", status_code=204)
def delete_label(label_id: str, session: SessionDep, user: CurrentUser) -> Response:
    """Delete a label: it is detached from every task and removed from every image."""
    label = get_label(session, user, label_id)
    if label.negative_for_task is not None:
        raise ConflictError("The negative label of a tagging task is deleted with its task, not alone.")
    session.delete(label)
    session.commit()
    return Response(status_code=204)


@router.delete("/{label_id}/wipe")
def wipe_label(label_id: str, session: SessionDep, user: CurrentUser) -> Any:
    """Remove the label from all its images (the label itself stays)."""
    label = get_label(session, user, label_id)
    result = session.execute(delete(ImageLabel).where(ImageLabel.label_id == label.id))
    session.commit()
    removed = getattr(result, "rowcount", 0) or 0
    return {"id": label.id, "removed_from_images": removed}


@router.post("/{label_id}/add-task")
def add_task(label_id: str, session: SessionDep, user: CurrentUser, body: BodyDep) -> Any:
    """The label-side twin of ``POST /task/{id}/add-label``."""
    data = parse(TaskIdBody, body)
    label = get_label(session, user, label_id)
    task_routes.add_label(data.task_id, session, user, {"label_id": label.id})
    return labels_public(session, [label], with_counts=True)[0]


@router.post("/{label_id}/remove-task")
def remove_task(label_id: str, session: SessionDep, user: CurrentUser, body: BodyDep) -> Any:
    data = parse(TaskIdBody, body)
    label = get_label(session, user, label_id)
    task_routes.remove_label(data.task_id, session, user, {"label_id": label.id})
    return labels_public(session, [label], with_counts=True)[0]
