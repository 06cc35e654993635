"""/recognition/v2/model: trained model versions of a task (written by the training run watcher)."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from sqlalchemy import select

from api.db.models import Model
from api.deps import BlobsDep, ClassifierDep, CurrentUser, SessionDep, SettingsDep
from api.http.pagination import paginate
from api.http.routing import SlashAgnosticRouter
from api.presenters import model_public
from api.services.lookups import get_model, get_task
from taskvision.errors import ConflictError

router = SlashAgnosticRouter(prefix="/recognition/v2/model", tags=["models"])


@router.get("/")
def list_models(request: Request, session: SessionDep, user: CurrentUser, settings: SettingsDep) -> Any:
    """Model versions of the workspace, newest version first; ``?task=<id>`` keeps one task's."""
    stmt = select(Model).where(Model.workspace_id == user.workspace_id)
    task_id = request.query_params.get("task")
    if task_id:
        stmt = stmt.where(Model.task_id == get_task(session, user, task_id).id)
    stmt = stmt.order_by(Model.task_id, Model.version.desc())
    return paginate(
        session,
        stmt,
        request=request,
        settings=settings,
        serialize=lambda rows: [model_public(m) for m in rows],
    )


@router.get("/{model_id}")
def get_model_detail(model_id: str, session: SessionDep, user: CurrentUser) -> Any:
    return model_public(get_model(session, user, model_id))


@router.delete("/{model_id}", status_code=204)
def delete_model(
    model_id: str, session: SessionDep, user: CurrentUser, blobs: BlobsDep, classifier: ClassifierDep
) -> Response:
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
