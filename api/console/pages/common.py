"""What every task page shares: loading the task (another workspace's is a 404 page), its tabs, form posts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from api.console.deps import Viewer
from api.console.rendering import PREFIX, redirect
from api.db.models import Task
from api.services.lookups import get_task
from taskvision.errors import NotFoundError, TaskVisionError

logger = logging.getLogger(__name__)

# The task pages' tabs: (tab id, title, path under /console/tasks/<id>).
TABS = [
    ("labels", "Labels", ""),
    ("images", "Images", "/images"),
    ("train", "Train", "/train"),
    ("review", "Review", "/review"),
    ("versions", "Versions", "/versions"),
    ("try", "Try it", "/try"),
]


def task_url(task: Task | str, path: str = "") -> str:
    task_id = task if isinstance(task, str) else task.id
    return f"{PREFIX}/tasks/{task_id}{path}"


def load_task(session: Session, viewer: Viewer, task_id: str) -> Task:
    """The viewer's task, or NotFoundError (a 404 page), whatever workspace it is really in."""
    return get_task(session, viewer.user, task_id)


def task_context(task: Task, tab: str) -> dict[str, Any]:
    return {
        "task": task,
        "tab": tab,
        "tabs": [(name, title, task_url(task, path)) for name, title, path in TABS],
        "task_base": task_url(task),
    }


def act(
    request: Request,
    session: Session,
    back: str,
    action: Callable[[], str | None],
    *,
    keep: tuple[type[TaskVisionError], ...] = (),
) -> Response:
    """Run a page's change and go back to ``back`` with what happened (or why not) as a flash.

    Another workspace's object stays a 404 page; every other refusal of the API
    (400, 409, 422...) is shown on the page the user came from, in the API's words,
    except the errors in ``keep``, raised (rolled back) for the page to show in full.
    """
    try:
        message = action()
    except TaskVisionError as exc:
        session.rollback()
        if isinstance(exc, (NotFoundError, *keep)):
            raise
        return redirect(request, back, flash=("error", exc.detail))
    return redirect(request, back, flash=("ok", message) if message else None)


async def form_fields(request: Request) -> dict[str, Any]:
    """The posted form as a dict (single values; text fields only)."""
    form = await request.form()
    return {key: value for key, value in form.items() if isinstance(value, str)}


async def form_list(request: Request, name: str) -> list[str]:
    form = await request.form()
    return [value for value in form.getlist(name) if isinstance(value, str) and value]
