"""/recognition/v2/training-run: a task's trainings, with their step, progress and outcome."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from sqlalchemy import select

from api.db.models import TrainingRun
from api.deps import CurrentUser, SessionDep, SettingsDep
from api.http.pagination import paginate
from api.http.routing import SlashAgnosticRouter
from api.presenters import run_public
from api.services.lookups import get_task
from taskvision.errors import NotFoundError

router = SlashAgnosticRouter(prefix="/recognition/v2/training-run", tags=["training runs"])


@router.get("/")
def list_runs(request: Request, session: SessionDep, user: CurrentUser, settings: SettingsDep) -> Any:
    """Training runs, newest first; ``?task=<id>`` keeps one task's."""
    stmt = select(TrainingRun).where(TrainingRun.workspace_id == user.workspace_id)
    task_id = request.query_params.get("task")
    if task_id:
        stmt = stmt.where(TrainingRun.task_id == get_task(session, user, task_id).id)
    stmt = stmt.order_by(TrainingRun.created.desc(), TrainingRun.id)
    return paginate(
        session,
        stmt,
        request=request,
        settings=settings,
        serialize=lambda rows: [run_public(r) for r in rows],
    )


@router.get("/{run_id}")
def get_run(run_id: str, session: SessionDep, user: CurrentUser) -> Any:
    run = session.scalar(
        select(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.workspace_id == user.workspace_id)
    )
    if run is None:
        raise NotFoundError(f"Training run {run_id} not found.")
    return run_public(run)
