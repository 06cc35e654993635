"""The task list (with create) and a task's deletion, confirmed by a page that says what goes with it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from api.console import actions, queries
from api.console.deps import CsrfChecked, ViewerDep
from api.console.pages.common import act, form_fields, load_task, task_context, task_url
from api.console.rendering import PREFIX, redirect, render
from api.deps import ServicesDep, SessionDep
from taskvision.errors import TaskVisionError
from taskvision.task_types import TaskType

router = APIRouter()

TASK_TYPES = [
    (TaskType.MULTI_CLASS, "Categorization", "Each image gets exactly one category."),
    (TaskType.MULTI_LABEL, "Tagging", "Each image gets any number of tags, or none."),
    (TaskType.REGRESSION, "Regression", "Each image gets a number, such as an age or a size."),
]


@router.get("/")
def home() -> Response:
    return RedirectResponse(f"{PREFIX}/tasks", status_code=307)


@router.get("/tasks")
def task_list(request: Request, session: SessionDep, viewer: ViewerDep) -> Response:
    return render(
        request,
        "tasks.html",
        {"summaries": queries.task_summaries(session, viewer.workspace_id), "task_types": TASK_TYPES},
        viewer=viewer,
    )


@router.post("/tasks", dependencies=[CsrfChecked])
async def create_task(request: Request, session: SessionDep, viewer: ViewerDep) -> Response:
    form = await form_fields(request)
    try:
        task_id = actions.create_task(session, viewer.user, form)
    except TaskVisionError as exc:
        session.rollback()
        return redirect(request, f"{PREFIX}/tasks", flash=("error", exc.detail))
    return redirect(request, task_url(task_id), flash=("ok", "Task created. Add its labels next."))


@router.get("/tasks/{task_id}/delete")
def confirm_delete(request: Request, task_id: str, session: SessionDep, viewer: ViewerDep) -> Response:
    task = load_task(session, viewer, task_id)
    return render(
        request,
        "task_delete.html",
        {**task_context(task, ""), "impact": queries.deletion_impact(session, task)},
        viewer=viewer,
    )


@router.post("/tasks/{task_id}/delete", dependencies=[CsrfChecked])
def delete_task(
    request: Request, task_id: str, session: SessionDep, services: ServicesDep, viewer: ViewerDep
) -> Response:
    task = load_task(session, viewer, task_id)
    name = task.name

    def delete() -> str:
        actions.delete_task(services, session, viewer.user, task.id)
        return f"Task '{name}' deleted."

    response = act(request, session, f"{PREFIX}/tasks", delete)
    return response


@router.post("/tasks/{task_id}/edit", dependencies=[CsrfChecked])
async def edit_task(
    request: Request, task_id: str, session: SessionDep, services: ServicesDep, viewer: ViewerDep
) -> Response:
    task = load_task(session, viewer, task_id)
    form = await form_fields(request)
    fields: dict[str, Any] = {key: form[key] for key in ("name", "description") if key in form}

    def edit() -> str:
        actions.update_task(services, session, viewer.user, task.id, fields)
        return "Task saved."

    return act(request, session, task_url(task), edit)
