"""/recognition/v2/training-run: a task's trainings, with their step, progress and outcome."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request
from sqlalchemy import select

from api.db.models import TrainingRun
from api.deps import CurrentUser, RunIdPath, SessionDep
from api.http.openapi import COMMON, errors
from api.http.pagination import PageDep, paginate
from api.http.routing import SlashAgnosticRouter
from api.presenters import runs_public
from api.schemas.common import ID_PATTERN, Page
from api.schemas.runs import TrainingRunPublic
from api.services.lookups import get_task
from taskvision.errors import NotFoundError

router = SlashAgnosticRouter(
    prefix="/recognition/v2/training-run", tags=["training runs"], responses=errors(*COMMON)
)


@router.get("/", response_model=Page[TrainingRunPublic])
def list_runs(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    task: Annotated[str | None, Query(pattern=ID_PATTERN, description="Only this task's runs.")] = None,
) -> Any:
    """Training runs, newest first."""
    stmt = select(TrainingRun).where(TrainingRun.workspace_id == user.workspace_id)
    if task:
        stmt = stmt.where(TrainingRun.task_id == get_task(session, user, task).id)
    stmt = stmt.order_by(TrainingRun.created.desc(), TrainingRun.id)
    return paginate(
        session, stmt, request=request, page=page, serialize=lambda rows: runs_public(session, rows)
    )


@router.get("/{run_id}", response_model=TrainingRunPublic)
def get_run(run_id: RunIdPath, session: SessionDep, user: CurrentUser) -> Any:
    run = session.scalar(
        select(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.workspace_id == user.workspace_id)
    )
    if run is None:
        raise NotFoundError(f"Training run {run_id} not found.")
    return runs_public(session, [run])[0]
