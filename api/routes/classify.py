"""POST /recognition/v2/classify: answers from a task's production (or a chosen) model version.

Request (Ximilar shape): ``{"task_id" | "task": id, "version": int | null,
"records": [{"_url": ...} | {"_base64": ...}, ...], "store_images": bool}``.
Each record is answered on its own: a bad record gets ``_status`` 400 with
the reason, and the others still succeed. Records echo their own fields
(except the bulky ``_base64``) and gain ``_status``, ``best_label``,
``labels``, ``_width``, ``_height`` (and ``_stored_image_id``).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.body import parse
from api.db.models import Model, User
from api.deps import BlobsDep, BodyDep, CurrentUser, SessionDep, SettingsDep, check_body_workspace
from api.inference_services import KubernetesUnavailable
from api.ingest import prepare_image, store_image
from api.lookups import get_task
from api.query import INT32_MAX
from api.routing import SlashAgnosticRouter
from api.settings import Settings
from api.url_fetch import fetch_many
from taskvision import imaging
from taskvision.errors import (
    BadRequestError,
    DuplicateImageError,
    NotFoundError,
    ServiceUnavailableError,
    TaskVisionError,
)
from taskvision.imaging import decode_base64

router = SlashAgnosticRouter(prefix="/recognition/v2/classify", tags=["classify"])

MAX_RECORDS = 10
OK = {"code": 200, "text": "OK"}


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    task_id: str | None = None
    task: str | None = None
    version: int | None = Field(default=None, ge=1, le=INT32_MAX)
    records: list[dict[str, Any]] = Field(default_factory=list)
    store_images: bool = False

    @field_validator("records", mode="before")
    @classmethod
    def _records_are_objects(cls, value: Any) -> Any:
        if isinstance(value, list) and not all(isinstance(r, dict) for r in value):
            raise ValueError("every record must be a JSON object")
        return value


@dataclass(frozen=True)
class _Target:
    """The task version a request is answered with (plain values: no DB session is held)."""

    task_id: str
    task_name: str
    version: int
    production_version: int
    bundle_uri: str


def _resolve_target(session: Session, user: User, task_id: str, version: int | None) -> _Target:
    """Look the task and version up, then give the DB connection back before any slow work."""
    try:
        task = get_task(session, user, task_id)
        chosen = version if version is not None else task.production_version
        if chosen is None or chosen < 1:
            raise BadRequestError(
                f"Task '{task.name}' has no trained model version yet; train it first.", code="not_trained"
            )
        model = session.scalar(select(Model).where(Model.task_id == task.id, Model.version == chosen))
        if model is None or model.train_status != "TRAINED":
            raise NotFoundError(f"Task '{task.name}' has no trained version {chosen}.")
        return _Target(task.id, task.name, chosen, task.production_version, model.bundle_uri)
    finally:
        session.close()


def _check_size(data: bytes, settings: Settings) -> bytes:
    if len(data) > settings.max_upload_bytes:
        raise BadRequestError(
            f"The image is larger than {settings.max_upload_bytes} bytes.", code="too_large"
        )
    return data


async def _record_bytes(
    request: Request, records: list[dict[str, Any]], settings: Settings, workspace: str
) -> dict[int, bytes | TaskVisionError]:
    """Each record's image bytes or its error. URLs are fetched together, under one deadline."""
    out: dict[int, bytes | TaskVisionError] = {}
    urls: dict[int, str] = {}
    for i, record in enumerate(records):
        if isinstance(record.get("_base64"), str) and record["_base64"]:
            continue  # decoded in the worker thread with the pixels (it can be 27 MB of text)
        if isinstance(record.get("_url"), str) and record["_url"]:
            urls[i] = record["_url"]
        else:
            out[i] = BadRequestError("The record has neither '_url' nor '_base64'.", code="no_image")
    if urls:
        fetched = await fetch_many(
            list(urls.values()), settings.fetch_policy(), request.app.state.fetch_slots, workspace=workspace
        )
        for i, result in zip(urls, fetched, strict=True):
            out[i] = result if isinstance(result, TaskVisionError) else _checked(result, settings)
    return out


def _checked(data: bytes, settings: Settings) -> bytes | TaskVisionError:
    try:
        return _check_size(data, settings)
    except TaskVisionError as exc:
        return exc


def _decode_base64_records(
    records: list[dict[str, Any]], fetched: dict[int, bytes | TaskVisionError], settings: Settings
) -> dict[int, bytes | TaskVisionError]:
    out = dict(fetched)
    for i, record in enumerate(records):
        if i not in out:
            try:
                out[i] = _check_size(decode_base64(record["_base64"]), settings)
            except TaskVisionError as exc:
                out[i] = exc
    return out


@router.post("")
async def classify(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    body: BodyDep,
    settings: SettingsDep,
    blobs: BlobsDep,
) -> Any:
    """Classify 1 to 10 images (``_base64`` or ``_url``) with a task's production or chosen version.

    Asynchronous on purpose: while the records' URLs are fetched, the request holds no
    worker thread and no database connection; decoding and the model run in the thread pool.
    """
    started = time.perf_counter()
    check_body_workspace(user, body)
    data = parse(ClassifyRequest, body)
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
    with request.app.state.classify_slots.hold(user.workspace_id):
        target = await run_in_threadpool(_resolve_target, session, user, task_id, data.version)
        fetched = await _record_bytes(request, data.records, settings, user.workspace_id)
        results = await run_in_threadpool(_answer, request, target, data.records, fetched, settings)
        if data.store_images:
            await run_in_threadpool(_store_all, session, blobs, user, settings, data.records, results)
    return {
        "task_id": target.task_id,
        "version": target.version,
        "records": [result for result, _ in results],
        "status": dict(OK),
        "statistics": {"processing time": round(time.perf_counter() - started, 5)},
    }


def _answer(
    request: Request,
    target: _Target,
    records: list[dict[str, Any]],
    fetched: dict[int, bytes | TaskVisionError],
    settings: Settings,
) -> list[tuple[dict[str, Any], bytes | None]]:
    """Each record's answer (and its image bytes, for store_images)."""
    results: list[dict[str, Any]] = [{k: v for k, v in r.items() if k != "_base64"} for r in records]
    raw: dict[int, bytes] = {}
    for i, item in _decode_base64_records(records, fetched, settings).items():
        if isinstance(item, TaskVisionError):
            results[i]["_status"] = _error_status(item)
        else:
            raw[i] = item
    reconciler = request.app.state.reconciler
    if reconciler is not None and target.version == target.production_version:
        _classify_on_cluster(reconciler, target, raw, results, settings)
    else:
        _classify_in_process(request, target.task_id, target.version, target.bundle_uri, raw, results)
    return [(result, raw.get(i)) for i, result in enumerate(results)]


def _store_all(
    session: Session,
    blobs: Any,
    user: User,
    settings: Settings,
    records: list[dict[str, Any]],
    results: list[tuple[dict[str, Any], bytes | None]],
) -> None:
    for record, (result, data) in zip(records, results, strict=True):
        if data is not None and result.get("_status", {}).get("code") == 200:
            result["_stored_image_id"] = _store(session, blobs, user, data, settings, record)


def _classify_in_process(
    request: Request,
    task_id: str,
    version: int,
    bundle_prefix: str,
    raw: dict[int, bytes],
    results: list[dict[str, Any]],
) -> None:
    """Embedded serving: the version's KServe predictor, hosted by this process."""
    predictor = request.app.state.serving.predictor(task_id, version, bundle_prefix)
    arrays: dict[int, Any] = {}
    for i, data in raw.items():
        try:
            arrays[i], (width, height) = predictor.decode(data)
            results[i].update({"_width": width, "_height": height})
        except TaskVisionError as exc:
            results[i]["_status"] = _error_status(exc)
    good = sorted(arrays)
    if good:
        outputs = predictor.outputs_for_arrays(np.stack([arrays[i] for i in good]))
        for i, row in zip(good, outputs, strict=True):
            results[i].update(predictor.describe(row))
            results[i]["_status"] = dict(OK)


def _classify_on_cluster(
    reconciler: Any, task: _Target, raw: dict[int, bytes], results: list[dict[str, Any]], settings: Settings
) -> None:
    """Cluster serving: the task's InferenceService, over KServe's V1 protocol."""
    try:
        endpoint = reconciler.endpoint(task.task_id)
    except KubernetesUnavailable as exc:
        raise ServiceUnavailableError(f"Serving of task '{task.task_name}' is unavailable: {exc}") from exc
    if not endpoint.ready:
        raise ServiceUnavailableError(
            f"The model of task '{task.task_name}' is starting (deploying, or scaled to zero); "
            "retry in a few seconds."
        )
    encoded: dict[int, str] = {}
    for i, data in raw.items():
        try:
            width, height = imaging.upright_size(data, max_pixels=settings.max_image_pixels)
            results[i].update({"_width": width, "_height": height})
            encoded[i] = base64.b64encode(data).decode()
        except TaskVisionError as exc:
            results[i]["_status"] = _error_status(exc)
    good = sorted(encoded)
    if not good:
        return
    url = f"{str(endpoint.url).rstrip('/')}/v1/models/{endpoint.model_name}:predict"
    try:
        response = httpx.post(
            url, json={"instances": [{"b64": encoded[i]} for i in good]}, timeout=settings.isvc_timeout_s
        )
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(f"The model of task '{task.task_name}' did not answer: {exc}") from exc
    if response.status_code == 400:  # the predictor refused an image (e.g. corrupt pixel data)
        for i in good:
            results[i]["_status"] = {"code": 400, "text": str(response.json().get("error", "invalid image"))}
        return
    if response.status_code != 200:
        raise ServiceUnavailableError(
            f"The model of task '{task.task_name}' answered HTTP {response.status_code}."
        )
    for i, prediction in zip(good, response.json()["predictions"], strict=True):
        results[i].update(prediction)
        results[i]["_status"] = dict(OK)


def _error_status(exc: TaskVisionError) -> dict[str, Any]:
    return {"code": exc.status if exc.status < 500 else 400, "text": exc.detail}


def _store(
    session: Any, blobs: Any, user: Any, data: bytes, settings: Settings, record: dict[str, Any]
) -> str:
    """Keep a classified image as an (unlabelled) training image for later review."""
    meta = record.get("meta_data") if isinstance(record.get("meta_data"), dict) else {}
    try:
        image = store_image(
            session, blobs, user, prepare_image(data, noresize=False, settings=settings), meta_data=meta
        )
    except DuplicateImageError as exc:
        return exc.image_id
    return image.id
