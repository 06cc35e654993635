"""Model versions: headline metrics, the production switch (and canary share), compare, evaluation.

The evaluation page draws the metrics stored with the version. Phase 2 adds,
in its ``mistakes`` block, the gallery of wrong test images (from the version's
per-image predictions), a drill-down from each confusion-matrix cell, and the
one-click label fix.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from api.console import actions, queries
from api.console.deps import CsrfChecked, ViewerDep
from api.console.evaluation import compare, evaluation, headline
from api.console.pages.common import act, form_fields, load_task, task_context, task_url
from api.console.rendering import render
from api.deps import ServicesDep, SessionDep, SettingsDep
from api.schemas.common import INT32_MAX
from taskvision.errors import BadRequestError, NotFoundError

router = APIRouter()

VersionNumber = Annotated[int, Query(ge=1, le=INT32_MAX)]


def _cluster(settings: SettingsDep) -> bool:
    return settings.serving_backend == "kserve"


@router.get("/tasks/{task_id}/versions")
def version_list(
    request: Request, task_id: str, session: SessionDep, settings: SettingsDep, viewer: ViewerDep
) -> Response:
    task = load_task(session, viewer, task_id)
    models = queries.versions(session, task)
    return render(
        request,
        "versions.html",
        {
            **task_context(task, "versions"),
            "models": models,
            "figures": {m.version: headline(task.type, m.metrics or {}) for m in models},
            "cluster": _cluster(settings),
        },
        viewer=viewer,
    )


@router.get("/tasks/{task_id}/versions/compare")
def compare_versions(
    request: Request,
    task_id: str,
    session: SessionDep,
    viewer: ViewerDep,
    a: VersionNumber,
    b: VersionNumber,
) -> Response:
    task = load_task(session, viewer, task_id)
    left, right = queries.version(session, task, a), queries.version(session, task, b)
    if left is None or right is None:
        raise NotFoundError("Choose two versions of this task.")
    return render(
        request,
        "compare.html",
        {
            **task_context(task, "versions"),
            "left": left,
            "right": right,
            "comparison": compare(task.type, left.metrics or {}, right.metrics or {}),
        },
        viewer=viewer,
    )


@router.get("/tasks/{task_id}/versions/{number}")
def version_evaluation(
    request: Request, task_id: str, number: int, session: SessionDep, viewer: ViewerDep
) -> Response:
    task = load_task(session, viewer, task_id)
    model = queries.version(session, task, number) if 1 <= number <= INT32_MAX else None
    if model is None:
        raise NotFoundError(f"Version {number} of this task not found.")
    return render(
        request,
        "evaluation.html",
        {
            **task_context(task, "versions"),
            "model": model,
            "evaluation": evaluation(task.type, model.metrics or {}),
            "run": queries.run_of_version(session, task, number),
        },
        viewer=viewer,
    )


@router.post("/tasks/{task_id}/versions/production", dependencies=[CsrfChecked])
async def switch_production(
    request: Request, task_id: str, session: SessionDep, services: ServicesDep, viewer: ViewerDep
) -> Response:
    task = load_task(session, viewer, task_id)
    form = await form_fields(request)

    def switch() -> str:
        raw = str(form.get("version", ""))
        if not (raw.isascii() and raw.isdigit()):
            raise BadRequestError("Choose a version.", code="unknown_version")
        actions.update_task(services, session, viewer.user, task.id, {"production_version": int(raw)})
        return f"Version {int(raw)} is now in production."

    return act(request, session, task_url(task, "/versions"), switch)


@router.post("/tasks/{task_id}/versions/canary", dependencies=[CsrfChecked])
async def set_canary(
    request: Request, task_id: str, session: SessionDep, services: ServicesDep, viewer: ViewerDep
) -> Response:
    """Cluster mode: the share of traffic a new production version gets first (empty: all of it)."""
    task = load_task(session, viewer, task_id)
    form = await form_fields(request)

    def canary() -> str:
        raw = str(form.get("canary_percent", "")).strip()
        if raw and not (raw.isascii() and raw.isdigit()):
            raise BadRequestError("Enter a whole percentage from 1 to 99, or nothing.", code="invalid_canary")
        percent = int(raw) if raw else None
        actions.update_task(services, session, viewer.user, task.id, {"canary_percent": percent})
        return (
            f"New versions get {percent} % of the traffic first."
            if percent
            else "New versions get all traffic."
        )

    return act(request, session, task_url(task, "/versions"), canary)
