"""Try it: classify a dropped, pasted or chosen image (or an image URL) with a version of the task.

The image goes through ``POST /v2/classify``'s own function (the same checks,
URL fetching rules and answer), and the page draws the answer: each label with
its probability (tagging: the tags above their thresholds stand out;
regression: the value, and ``out_of_range`` when the answer carries it).
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from api.console import actions, queries
from api.console.charts import probability_bars
from api.console.deps import CsrfChecked, Viewer, ViewerDep
from api.console.pages.common import load_task, task_context
from api.console.rendering import render
from api.db.models import Task
from api.deps import ServicesDep, SessionDep
from api.services.container import Services
from taskvision import imaging
from taskvision.errors import NotFoundError, PayloadTooLargeError, TaskVisionError
from taskvision.task_types import TaskType

router = APIRouter()

PREVIEW_SIDE = 320


def _page(
    request: Request,
    task: Task,
    viewer: Viewer,
    session: SessionDep,
    *,
    result: dict[str, Any] | None = None,
    status_code: int = 200,
) -> Response:
    models = queries.versions(session, task)
    return render(
        request,
        "try.html",
        {**task_context(task, "try"), "models": models, "result": result},
        viewer=viewer,
        status_code=status_code,
    )


@router.get("/tasks/{task_id}/try")
def try_page(request: Request, task_id: str, session: SessionDep, viewer: ViewerDep) -> Response:
    task = load_task(session, viewer, task_id)
    return _page(request, task, viewer, session)


def _preview(data: bytes, services: Services) -> str | None:
    """A small re-encoded JPEG of the image as a data: URL (never the user's bytes as they came)."""
    try:
        jpeg = imaging.thumbnail_jpeg(
            data, max_side=PREVIEW_SIDE, max_pixels=services.settings.max_image_pixels
        )
    except TaskVisionError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def _answer_view(task: Task, record: dict[str, Any]) -> dict[str, Any]:
    """What the result panel shows of one classified record."""
    status = record.get("_status") or {}
    view: dict[str, Any] = {"ok": status.get("code") == 200, "error": status.get("text", "")}
    if not view["ok"]:
        return view
    best = record.get("best_label")
    labels = record.get("labels") or []
    if task.type == TaskType.REGRESSION:
        view["values"] = [
            {
                "name": label.get("name"),
                "value": label.get("value"),
                "out_of_range": label.get("out_of_range"),
            }
            for label in labels
        ]
        view["out_of_range"] = record.get(
            "out_of_range", (best or {}).get("out_of_range") if isinstance(best, dict) else None
        )
        return view
    chosen = best if isinstance(best, list) else [best] if isinstance(best, dict) else []
    view["best"] = [str(item.get("name")) for item in chosen if isinstance(item, dict)]
    view["bars"] = probability_bars(
        labels, {str(item.get("id")) for item in chosen if isinstance(item, dict)}
    )
    view["size"] = (record.get("_width"), record.get("_height"))
    return view


@router.post("/tasks/{task_id}/try", dependencies=[CsrfChecked])
async def try_image(
    request: Request, task_id: str, session: SessionDep, services: ServicesDep, viewer: ViewerDep
) -> Response:
    task = load_task(session, viewer, task_id)
    limit = services.settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit + 1024 * 1024:
        raise PayloadTooLargeError(f"The image is larger than {limit} bytes.")
    form = await request.form(max_files=1)
    upload, url = form.get("file"), str(form.get("url") or "").strip()
    raw_version = str(form.get("version") or "")
    version = int(raw_version) if raw_version.isascii() and raw_version.isdigit() else None
    preview = None
    record: dict[str, Any]
    if isinstance(upload, UploadFile) and upload.filename:
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLargeError(f"The image is larger than {limit} bytes.")
        record = {"_base64": base64.b64encode(data).decode()}
        preview = _preview(data, services)
    elif url:
        record = {"_url": url}
    else:
        return _page(
            request,
            task,
            viewer,
            session,
            result={"ok": False, "error": "Choose, drop or paste an image, or enter its URL."},
            status_code=400,
        )
    task_id_value, task_name = task.id, task.name
    try:
        answer = await actions.classify(services, session, viewer.user, task_id_value, version, record)
    except NotFoundError as exc:
        return _reload(request, task_id_value, viewer, session, exc.detail)
    except TaskVisionError as exc:
        return _reload(request, task_id_value, viewer, session, exc.detail)
    task = load_task(session, viewer, task_id_value)
    result = _answer_view(task, answer["records"][0])
    result.update(
        preview=preview, url=url if not preview else "", version=answer.get("version"), task_name=task_name
    )
    return _page(request, task, viewer, session, result=result)


def _reload(request: Request, task_id: str, viewer: Viewer, session: SessionDep, message: str) -> Response:
    task = load_task(session, viewer, task_id)
    return _page(request, task, viewer, session, result={"ok": False, "error": message}, status_code=400)
