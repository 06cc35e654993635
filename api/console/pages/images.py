"""The images page: a thumbnail grid with filters and paging, bulk label edits, inline values, uploads.

The filter "wrong in the last evaluation" shows the images the task's production version (else the
newest) answered wrong in its evaluation: the test split's, or with the training images it answered
out of fold (``show=wrong-all``).

Thumbnails are served here with the session (``/console/images/<id>/thumb``),
lazy-loaded by the browser; the REST API's download links are not needed.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.console import actions, queries, uploads
from api.console.deps import CsrfChecked, Viewer, ViewerDep
from api.console.evaluation import evaluation_mistakes
from api.console.pages.common import act, form_fields, form_list, load_task, task_context, task_url
from api.console.refusals import MAX_LINKED_IMAGES
from api.console.rendering import render
from api.db.models import Label, Task, TrainingImage
from api.deps import ServicesDep, SessionDep
from api.schemas.images import MAX_BULK_IDS
from api.services.container import Services
from taskvision.errors import BadRequestError, NotFoundError, PayloadTooLargeError, TaskVisionError
from taskvision.task_types import TaskType

router = APIRouter()

PAGE_SIZE = 60
MAX_PAGE = 100_000


def _page_url(task: Task, show: str, label: str | None, page: int, ids: str = "") -> str:
    params: dict[str, Any] = {"show": show}
    if label:
        params["label"] = label
    if ids:
        params["ids"] = ids
    if page > 1:
        params["page"] = page
    return task_url(task, "/images") + "?" + urlencode(params)


@router.get("/tasks/{task_id}/images")
def image_grid(
    request: Request,
    task_id: str,
    session: SessionDep,
    services: ServicesDep,
    viewer: ViewerDep,
    show: Annotated[str, Query(max_length=32)] = "all",
    label: Annotated[str | None, Query(max_length=64)] = None,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    ids: Annotated[str, Query(max_length=MAX_LINKED_IMAGES * 40)] = "",
) -> Response:
    """The grid; ``ids`` (comma-separated) shows just those images (e.g. the ones a train request named)."""
    task = load_task(session, viewer, task_id)
    show = show if show in queries.IMAGE_FILTERS else "all"
    label = label if label and any(lb.id == label for lb in task.labels) else None
    only = [i for i in ids.split(",") if i][:MAX_LINKED_IMAGES] if ids else None
    ids = ",".join(only or [])
    wrong = evaluation_mistakes(session, services.blobs, task)
    grid = queries.image_page(
        session,
        task,
        show=show,
        label_id=label,
        page=page,
        page_size=PAGE_SIZE,
        only_ids=only,
        mistakes=wrong,
    )
    value_label = task.labels[0] if task.type == TaskType.REGRESSION and task.labels else None
    return render(
        request,
        "images.html",
        {
            **task_context(task, "images"),
            "grid": grid,
            "show": show,
            "label_filter": label,
            "filters": [
                f
                for f in queries.IMAGE_FILTERS.values()
                if f.in_bar and (wrong is not None or not f.needs_evaluation)
            ],
            "mistakes": wrong,
            "page_url": lambda n: _page_url(task, show, label, n, ids),
            "filter_url": lambda name, lb=None: _page_url(task, name, lb, 1),
            "here": _page_url(task, show, label, page, ids),
            "picked": only is not None,
            "value_label": value_label,
            # the task's own labels first, a tagging task's negative label ("none of the tags") last
            "labels": sorted(task.labels, key=lambda lb: lb.negative_for_task == task.id),
            "regression": task.type == TaskType.REGRESSION,
        },
        viewer=viewer,
    )


def _back(task: Task, form: dict[str, Any]) -> str:
    """The grid page the form came from (only a page of this task's grid)."""
    back = str(form.get("back", ""))
    return back if back.startswith(task_url(task, "/images")) else task_url(task, "/images")


def _label_of(task: Task, label_id: str) -> Label:
    label = next((lb for lb in task.labels if lb.id == label_id), None)
    if label is None:
        raise BadRequestError("Choose one of the task's labels.", code="unknown_label")
    return label


@router.post("/tasks/{task_id}/images/bulk", dependencies=[CsrfChecked])
async def bulk_edit(request: Request, task_id: str, session: SessionDep, viewer: ViewerDep) -> Response:
    """Set or remove a label, mark test images, set a value or delete, for the selected images."""
    task = load_task(session, viewer, task_id)
    form = await form_fields(request)
    selected = (await form_list(request, "image_ids"))[:MAX_BULK_IDS]
    action = str(form.get("action", ""))

    def run() -> str:
        ids = queries.owned_image_ids(session, viewer.workspace_id, selected)
        if not ids:
            raise BadRequestError("Select at least one image first.", code="no_selection")
        n = len(ids)
        what = f"{n} image{'s' if n != 1 else ''}"
        if action == "set-label":
            label = _label_of(task, str(form.get("label_id", "")))
            actions.set_label(session, viewer.user, task, ids, label)
            return f"'{label.name}' set on {what}."
        if action == "remove-label":
            label = _label_of(task, str(form.get("label_id", "")))
            actions.remove_label(session, viewer.user, ids, label.id)
            return f"'{label.name}' removed from {what}."
        if action in ("test", "not-test"):
            actions.mark_test(session, viewer.user, ids, action == "test")
            return f"{what} marked as {'test' if action == 'test' else 'training'} images."
        if action == "set-value":
            label = _label_of(task, str(form.get("label_id", "")))
            actions.set_value(request, session, viewer.user, ids, label.id, form.get("value", ""))
            return f"Value set on {what}."
        if action == "delete":
            actions.delete_images(session, viewer.user, ids)
            return f"{what} deleted."
        raise BadRequestError("Choose what to do with the selected images.", code="no_action")

    return act(request, session, _back(task, form), run)


@router.post("/tasks/{task_id}/images/{image_id}/value", dependencies=[CsrfChecked])
async def edit_value(
    request: Request, task_id: str, image_id: str, session: SessionDep, viewer: ViewerDep
) -> Response:
    """Inline edit of a regression value (htmx swaps the returned field in; plain posts go back)."""
    task = load_task(session, viewer, task_id)
    form = await form_fields(request)
    if task.type != TaskType.REGRESSION or not task.labels:
        raise NotFoundError("This task has no values.")
    label = task.labels[0]
    if not request.headers.get("hx-request"):

        def save() -> str:
            actions.set_value(request, session, viewer.user, [image_id], label.id, form.get("value", ""))
            return "Value saved."

        return act(request, session, _back(task, form), save)
    error = ""
    try:
        actions.set_value(request, session, viewer.user, [image_id], label.id, form.get("value", ""))
    except NotFoundError:
        raise
    except TaskVisionError as exc:
        session.rollback()
        error = exc.detail
    link = session.scalar(
        select(TrainingImage).where(
            TrainingImage.id == image_id, TrainingImage.workspace_id == viewer.workspace_id
        )
    )
    value = next((lk.value for lk in link.label_links if lk.label_id == label.id), None) if link else None
    return render(
        request,
        "_value_form.html",
        {
            "task_base": task_url(task),
            "image_id": image_id,
            "value": value,
            "error": error,
            "saved": not error,
        },
        viewer=viewer,
    )


@router.post("/tasks/{task_id}/images/upload", dependencies=[CsrfChecked])
async def upload(
    request: Request, task_id: str, session: SessionDep, services: ServicesDep, viewer: ViewerDep
) -> Response:
    """One file of an upload (an image or a zip); answers the summary as JSON for console.js."""
    task = load_task(session, viewer, task_id)
    declared = request.headers.get("content-length", "")
    if not (declared.isascii() and declared.isdigit()) or int(declared) > uploads.MAX_REQUEST_BYTES:
        raise PayloadTooLargeError(f"Send at most {uploads.MAX_REQUEST_BYTES} bytes per file.")
    form = await request.form(max_files=1)
    file = form.get("file")
    if not isinstance(file, UploadFile):
        return JSONResponse({"detail": "Choose a file to upload."}, status_code=400)
    label_id = str(form.get("label_id") or "")
    label = _label_of(task, label_id) if label_id else None
    summary = await run_in_threadpool(
        uploads.ingest_file,
        session,
        services.blobs,
        viewer.user,
        services.settings,
        name=file.filename or "upload",
        stream=file.file,
    )

    def apply_labels() -> None:
        by_name = {lb.name.casefold(): lb for lb in task.labels}
        for folder, ids in summary.images_by_folder.items():
            chosen = label or by_name.get(folder.casefold())
            if chosen is not None and ids and task.type != TaskType.REGRESSION:
                actions.set_label(session, viewer.user, task, ids, chosen)

    try:
        await run_in_threadpool(apply_labels)
    except TaskVisionError as exc:
        session.rollback()
        summary.note(file.filename or "upload", f"stored, but not labelled: {exc.detail}")
    return JSONResponse(summary.public())


@router.get("/images/{image_id}/thumb")
def thumbnail(
    request: Request, image_id: str, session: SessionDep, services: ServicesDep, viewer: ViewerDep
) -> Response:
    return _image_bytes(request, image_id, session, services, viewer, thumb=True)


@router.get("/images/{image_id}/file")
def image_file(
    request: Request, image_id: str, session: SessionDep, services: ServicesDep, viewer: ViewerDep
) -> Response:
    return _image_bytes(request, image_id, session, services, viewer, thumb=False)


def _image_bytes(
    request: Request, image_id: str, session: Session, services: Services, viewer: Viewer, *, thumb: bool
) -> Response:
    row = session.execute(
        select(
            TrainingImage.thumb_key, TrainingImage.blob_key, TrainingImage.sha256, TrainingImage.content_type
        ).where(TrainingImage.id == image_id, TrainingImage.workspace_id == viewer.workspace_id)
    ).first()
    if row is None:
        raise NotFoundError(f"Training image {image_id} not found.")
    thumb_key, blob_key, sha256, content_type = row
    etag = f'"{sha256}{"-t" if thumb else ""}"'
    headers = {"Cache-Control": "private, max-age=86400", "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    session.close()  # no DB connection held while the blob is read
    data = services.blobs.get(thumb_key if thumb else blob_key)
    return Response(data, media_type="image/jpeg" if thumb else content_type, headers=headers)
