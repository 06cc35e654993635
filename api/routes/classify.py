"""POST /recognition/v2/classify: answers from a task's production (or a chosen) model version.

Request (Ximilar shape): ``{"task_id" | "task": id, "version": int | null,
"records": [{"_url": ...} | {"_base64": ...}, ...], "store_images": bool,
"explain": bool}``.
Each record is answered on its own: a bad record gets ``_status`` 400 with
the reason, and the others still succeed. Records echo their own fields
(except the bulky ``_base64``) and gain ``_status``, ``best_label``,
``labels``, ``_width``, ``_height`` (and ``_stored_image_id``; with
``"explain": true``, ``_explanations``: heat maps of the best label or tags,
see :mod:`taskvision.explain`).

This route validates the request, gathers each record's image bytes and
shapes the answer; the model runs in the configured backend
(:mod:`api.services.classifiers`). It is asynchronous on purpose: while the
records' URLs are fetched, the request holds no worker thread and no database
connection; decoding and the model run in the thread pool.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, select
from sqlalchemy.orm import InstrumentedAttribute, Session
from starlette.concurrency import run_in_threadpool

from api.db.models import Model, Task, TrainStatus, User
from api.deps import (
    BlobsDep,
    ClassifierDep,
    ClassifySlotsDep,
    CurrentUser,
    FetchSlotsDep,
    SessionDep,
    SettingsDep,
    body_of,
)
from api.http.openapi import COMMON, also_document, errors
from api.http.routing import SlashAgnosticRouter
from api.schemas.classify import MAX_RECORDS, ClassifyRecord, ClassifyRequest, ClassifyResponse
from api.services import review
from api.services.classifiers import Answer, Classifier, ClassifyTarget
from api.services.ingest import prepare_image, store_image
from api.services.lookups import get_task
from api.services.url_fetch import FetchSlots, fetch_many
from api.settings import Settings
from taskvision.errors import BadRequestError, DuplicateImageError, NotFoundError, TaskVisionError
from taskvision.imaging import decode_base64
from taskvision.storage import BlobStore

router = SlashAgnosticRouter(prefix="/recognition/v2/classify", tags=["classify"])

OK = {"code": 200, "text": "OK"}

# A record's image bytes, or why it has none.
Source = bytes | TaskVisionError


ClassifyBody = Annotated[ClassifyRequest, body_of(ClassifyRequest)]
also_document(ClassifyRecord)


@router.post(
    "",
    response_model=ClassifyResponse,
    response_model_exclude_unset=True,
    responses=errors(*COMMON, 503),
)
async def classify(
    session: SessionDep,
    user: CurrentUser,
    data: ClassifyBody,
    settings: SettingsDep,
    blobs: BlobsDep,
    classifier: ClassifierDep,
    slots: ClassifySlotsDep,
    fetch_slots: FetchSlotsDep,
) -> Any:
    """Classify 1 to 10 images (``_base64`` or ``_url``) with a task's production or chosen version."""
    started = time.perf_counter()
    task_id = data.task_id or data.task
    if not task_id:
        raise BadRequestError("Name the task: 'task_id' (or 'task').", code="no_task")
    if not data.records:
        raise BadRequestError("Send 1 to 10 records to classify.", code="no_records")
    if len(data.records) > MAX_RECORDS:
        raise BadRequestError(
            f"At most {MAX_RECORDS} records per request; this one has {len(data.records)}.",
            code="too_many_records",
        )
    with slots.hold(user.workspace_id):
        if any(_url_of(record) for record in data.records):
            target = await run_in_threadpool(_resolve_target, session, user, task_id, data.version)
            fetched = await _fetch_urls(data.records, settings, fetch_slots, user.workspace_id)
            records, sources = await run_in_threadpool(
                _answer, classifier, target, data.records, fetched, settings, data.explain
            )
        else:  # nothing to fetch: the lookup and the model in one trip to the thread pool
            target, (records, sources) = await run_in_threadpool(
                _resolve_and_answer, session, user, task_id, data, classifier, settings
            )
        if data.store_images:
            await run_in_threadpool(
                _store_all, session, blobs, user, settings, target, data.records, records, sources
            )
    return {
        "task_id": target.task_id,
        "version": target.version,
        "records": records,
        "status": dict(OK),
        "statistics": {"processing time": round(time.perf_counter() - started, 5)},
    }


def _target_query(
    version: ColumnElement[int] | InstrumentedAttribute[int],
) -> Select[str, str, int, int, str, str]:
    """The task (by id and workspace) joined to one of its versions: plain columns, one query."""
    return (
        select(
            Task.id, Task.name, Task.production_version, Model.version, Model.train_status, Model.bundle_uri
        )
        .outerjoin(Model, and_(Model.task_id == Task.id, Model.version == version))
        .where(Task.id == bindparam("task_id"), Task.workspace_id == bindparam("workspace_id"))
    )


# Built once: making the statement on every request took about half of this lookup's time.
_PRODUCTION_TARGET = _target_query(Task.production_version)
_CHOSEN_TARGET = _target_query(bindparam("version"))


def _resolve_target(session: Session, user: User, task_id: str, version: int | None) -> ClassifyTarget:
    """Look the task and version up, then give the DB connection back before any slow work.

    One query of plain columns (the task joined to the asked-for or production version):
    this runs on every classify request, and loading the two ORM objects took two queries.
    """
    params: dict[str, Any] = {"task_id": str(task_id), "workspace_id": user.workspace_id}
    if version is not None:
        params["version"] = version
    try:
        row = session.execute(_PRODUCTION_TARGET if version is None else _CHOSEN_TARGET, params).first()
    finally:
        session.close()
    if row is None:
        raise NotFoundError(f"Task {task_id} not found.")
    chosen = version if version is not None else row.production_version
    if chosen is None or chosen < 1:
        raise BadRequestError(
            f"Task '{row.name}' has no trained model version yet; train it first.", code="not_trained"
        )
    if row.version is None or row.train_status != TrainStatus.TRAINED:
        raise NotFoundError(f"Task '{row.name}' has no trained version {chosen}.")
    return ClassifyTarget(row.id, row.name, chosen, row.production_version, row.bundle_uri)


def _resolve_and_answer(
    session: Session,
    user: User,
    task_id: str,
    data: ClassifyRequest,
    classifier: Classifier,
    settings: Settings,
) -> tuple[ClassifyTarget, tuple[list[dict[str, Any]], list[Source]]]:
    """:func:`_resolve_target` then :func:`_answer`, for records that need no fetching."""
    target = _resolve_target(session, user, task_id, data.version)
    return target, _answer(classifier, target, data.records, {}, settings, data.explain)


def _check_size(data: bytes, settings: Settings) -> Source:
    if len(data) > settings.max_upload_bytes:
        return BadRequestError(
            f"The image is larger than {settings.max_upload_bytes} bytes.", code="too_large"
        )
    return data


async def _fetch_urls(
    records: list[dict[str, Any]], settings: Settings, slots: FetchSlots, workspace: str
) -> dict[int, Source]:
    """The bytes of the records given by ``_url``, fetched together under one deadline."""
    urls = {i: url for i, record in enumerate(records) if (url := _url_of(record))}
    if not urls:
        return {}
    fetched = await fetch_many(list(urls.values()), settings.fetch_policy(), slots, workspace=workspace)
    return {
        i: result if isinstance(result, TaskVisionError) else _check_size(result, settings)
        for i, result in zip(urls, fetched, strict=True)
    }


def _url_of(record: dict[str, Any]) -> str | None:
    """The URL to fetch a record's image from (None when it has ``_base64``, or no URL)."""
    url = record.get("_url")
    if _has_base64(record) or not isinstance(url, str) or not url:
        return None
    return url


def _has_base64(record: dict[str, Any]) -> bool:
    return isinstance(record.get("_base64"), str) and bool(record["_base64"])


def _source(record: dict[str, Any], fetched: dict[int, Source], index: int, settings: Settings) -> Source:
    if _has_base64(record):
        try:
            return _check_size(decode_base64(record["_base64"]), settings)
        except TaskVisionError as exc:
            return exc
    if index in fetched:
        return fetched[index]
    return BadRequestError("The record has neither '_url' nor '_base64'.", code="no_image")


def _answer(
    classifier: Classifier,
    target: ClassifyTarget,
    records: list[dict[str, Any]],
    fetched: dict[int, Source],
    settings: Settings,
    explain: bool = False,
) -> tuple[list[dict[str, Any]], list[Source]]:
    """Each record's answer in the Ximilar shape, and its image bytes (for store_images)."""
    sources = [_source(record, fetched, i, settings) for i, record in enumerate(records)]
    images = {i: source for i, source in enumerate(sources) if isinstance(source, bytes)}
    answers: dict[int, Answer] = classifier.classify(target, images, explain=explain) if images else {}
    results: list[dict[str, Any]] = []
    for i, record in enumerate(records):
        result = {k: v for k, v in record.items() if k != "_base64"}
        outcome = answers.get(i, sources[i])
        if isinstance(outcome, TaskVisionError):
            result["_status"] = _error_status(outcome)
        elif isinstance(outcome, dict):
            result.update(outcome)
            result["_status"] = dict(OK)
        results.append(result)
    return results, sources


def _error_status(exc: TaskVisionError) -> dict[str, Any]:
    return {"code": exc.status if exc.status < 500 else 400, "text": exc.detail}


def _store_all(
    session: Session,
    blobs: BlobStore,
    user: User,
    settings: Settings,
    target: ClassifyTarget,
    records: list[dict[str, Any]],
    results: list[dict[str, Any]],
    sources: list[Source],
) -> None:
    """Keep each classified image as an (unlabelled) training image for later review."""
    task = get_task(session, user, target.task_id)
    for record, result, source in zip(records, results, sources, strict=True):
        if not isinstance(source, bytes) or result.get("_status", {}).get("code") != 200:
            continue
        meta = record.get("meta_data") if isinstance(record.get("meta_data"), dict) else {}
        try:
            prepared = prepare_image(source, noresize=False, settings=settings)
            result["_stored_image_id"] = store_image(session, blobs, user, prepared, meta_data=meta).id
        except DuplicateImageError as exc:
            result["_stored_image_id"] = exc.image_id
        # What the model said, for the review queue (GET /task/{id}/review).
        review.record_prediction(
            session, image_id=result["_stored_image_id"], task=task, version=target.version, answer=result
        )
