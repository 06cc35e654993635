"""/recognition/v2/model: trained model versions of a task (registered by the run watcher)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request, Response
from sqlalchemy import select

from api.db.models import Model
from api.deps import BlobsDep, ClassifierDep, CurrentUser, ModelIdPath, SessionDep
from api.http.openapi import COMMON, errors
from api.http.pagination import PageDep, paginate
from api.http.routing import SlashAgnosticRouter
from api.presenters import model_public
from api.schemas.common import ID_PATTERN, Page
from api.schemas.models import ModelPublic
from api.services.lookups import get_model, get_task
from taskvision.errors import ConflictError

router = SlashAgnosticRouter(prefix="/recognition/v2/model", tags=["models"], responses=errors(*COMMON))


@router.get("/", response_model=Page[ModelPublic])
def list_models(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    task: Annotated[str | None, Query(pattern=ID_PATTERN, description="Only this task's versions.")] = None,
) -> Any:
    """Model versions of the workspace, newest version first."""
    stmt = select(Model).where(Model.workspace_id == user.workspace_id)
    if task:
        stmt = stmt.where(Model.task_id == get_task(session, user, task).id)
    stmt = stmt.order_by(Model.task_id, Model.version.desc())
    return paginate(
        session, stmt, request=request, page=page, serialize=lambda rows: [model_public(m) for m in rows]
    )


@router.get("/{model_id}", response_model=ModelPublic)
def get_model_detail(model_id: ModelIdPath, session: SessionDep, user: CurrentUser) -> Any:
    return model_public(get_model(session, user, model_id))


@router.delete("/{model_id}", status_code=204, response_class=Response, responses=errors(409))
def delete_model(
    model_id: ModelIdPath, session: SessionDep, user: CurrentUser, blobs: BlobsDep, classifier: ClassifierDep
) -> Response:
    """Delete a version that is not in production, with its bundle."""
    model = get_model(session, user, model_id)
    if model.task.production_version == model.version:
        raise ConflictError(
            f"Version {model.version} is in production for task '{model.task.name}'; "
            "switch production to another version first."
        )
    prefix = model.bundle_uri
    classifier.unload_version(model.task_id, model.version)
    session.delete(model)
    session.commit()
    if prefix:
        blobs.delete_prefix(prefix)
    return Response(status_code=204)
