"""Model versions: headline metrics, the production switch (and canary share), compare, evaluation.

The evaluation page draws the metrics stored with the version and, from its
per-image predictions (:mod:`api.services.evaluations`, as
``GET /model/{id}/predictions`` serves them), a gallery of the images it got
wrong (the most confident mistakes first), the images behind a confusion-matrix
cell (``?actual=&predicted=``), and a one-click fix that gives an image the
label the model predicted when the label was the mistake. A regression version's
test images are drawn too: predicted against actual, and the errors' distribution.
"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from api.console import actions, queries
from api.console.deps import CsrfChecked, ViewerDep
from api.console.evaluation import compare, evaluation, headline, mistakes, regression_charts
from api.console.pages.common import act, form_fields, load_task, task_context, task_url
from api.console.rendering import render
from api.db.models import Task
from api.deps import ServicesDep, SessionDep, SettingsDep
from api.schemas.common import ID_PATTERN, INT32_MAX
from api.services import evaluations
from taskvision.errors import BadRequestError, NotFoundError

router = APIRouter()

VersionNumber = Annotated[int, Query(ge=1, le=INT32_MAX)]
LabelName = Annotated[str | None, Query(max_length=256)]
GALLERY_PAGE = 24


def evaluation_url(task: Task, number: int, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v not in (None, "", 1, "test")})
    return task_url(task, f"/versions/{number}") + (f"?{query}" if query else "") + "#mistakes"


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
    request: Request,
    task_id: str,
    number: int,
    session: SessionDep,
    services: ServicesDep,
    viewer: ViewerDep,
    actual: LabelName = None,
    predicted: LabelName = None,
    split: Annotated[str, Query(max_length=8)] = "test",
    page: Annotated[int, Query(ge=1, le=10_000)] = 1,
) -> Response:
    """The version's figures; its wrong images (or, with ``actual`` and ``predicted``, one cell's)."""
    task = load_task(session, viewer, task_id)
    model = queries.version(session, task, number) if 1 <= number <= INT32_MAX else None
    if model is None:
        raise NotFoundError(f"Version {number} of this task not found.")
    split = split if split in ("test", "all") else "test"
    cell = actual is not None and predicted is not None
    records = evaluations.read_predictions(services.blobs, model)
    chosen = evaluations.select(
        records,
        evaluations.PredictionFilter(
            split="test" if cell else split,  # type: ignore[arg-type]
            wrong=None if cell else True,
            true_label=actual if cell else None,
            predicted_label=predicted if cell else None,
        ),
    )
    gallery = mistakes(session, task, chosen, page=page, page_size=GALLERY_PAGE)
    charts = (
        regression_charts(
            evaluations.select(records, evaluations.PredictionFilter(split="test")), model.metrics or {}
        )
        if task.type == "regression" and records
        else None
    )
    here = evaluation_url(task, number, actual=actual, predicted=predicted, split=split, page=page)
    return render(
        request,
        "evaluation.html",
        {
            **task_context(task, "versions"),
            "model": model,
            "evaluation": evaluation(task.type, model.metrics or {}),
            "run": queries.run_of_version(session, task, number),
            "has_predictions": bool(records),
            "charts": charts,
            "gallery": gallery,
            "cell": (actual, predicted) if cell else None,
            "split": split,
            "here": here,
            "cell_url": lambda a, p: evaluation_url(task, number, actual=a, predicted=p),
            "split_url": lambda name: evaluation_url(task, number, split=name),
            "page_url": lambda n: evaluation_url(
                task, number, actual=actual, predicted=predicted, split=split, page=n
            ),
        },
        viewer=viewer,
    )


@router.post("/tasks/{task_id}/versions/{number}/fix/{image_id}", dependencies=[CsrfChecked])
async def fix_label(
    request: Request,
    task_id: str,
    number: int,
    image_id: str,
    session: SessionDep,
    services: ServicesDep,
    viewer: ViewerDep,
) -> Response:
    """Give the image what the version predicted for it (the label, not the model, was wrong)."""
    task = load_task(session, viewer, task_id)
    model = queries.version(session, task, number) if 1 <= number <= INT32_MAX else None
    if model is None or not re.fullmatch(ID_PATTERN, image_id):
        raise NotFoundError(f"Version {number} of this task has no image {image_id}.")
    record = next(
        (r for r in evaluations.read_predictions(services.blobs, model) if r.get("image_id") == image_id),
        None,
    )
    if record is None:
        raise NotFoundError(f"Version {number} of this task has no image {image_id}.")
    form = await form_fields(request)
    back = str(form.get("back", ""))
    back = back if back.startswith(task_url(task, f"/versions/{number}")) else evaluation_url(task, number)
    predicted_labels = list(record.get("predicted_labels") or [])

    def fix() -> str:
        if task.type == "regression":
            value = predicted_labels[0].get("value") if predicted_labels else None
            actions.review(request, session, services, viewer.user, task.id, image_id, {"value": value})
            return f"The image's value is now {value}."
        ids = [str(label["id"]) for label in predicted_labels]
        actions.review(request, session, services, viewer.user, task.id, image_id, {"label_ids": ids})
        names = ", ".join(f"'{label.get('name')}'" for label in predicted_labels) or "none of the tags"
        return f"The image is now labelled {names}."

    return act(request, session, back, fix)


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
