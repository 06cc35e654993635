"""POST /recognition/v2/classify: answers from a task's production (or a chosen) model version.

Request (Ximilar shape): ``{"task_id" | "task": id, "version": int | null,
"records": [{"_url": ...} | {"_base64": ...}, ...], "store_images": bool,
"explain": bool}``.
Each record is answered on its own: a bad record gets ``_status`` 400 with
the reason, and the others still succeed. Records echo their own fields
(except the bulky ``_base64``) and gain ``_status``, ``best_label``,
``labels``, ``_width``, ``_height`` (and ``_stored_image_id``; with
``explain``, ``_explanations``: heat maps of the best label or tags, see
:mod:`taskvision.explain`).
"""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from api.body import parse
from api.db.models import Model
from api.deps import BlobsDep, BodyDep, CurrentUser, SessionDep, SettingsDep, check_body_workspace
from api.inference_services import KubernetesUnavailable
from api.ingest import prepare_image, store_image
from api.lookups import get_task
from api.routing import SlashAgnosticRouter
from api.settings import Settings
from api.url_fetch import fetch_image_bytes
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
    version: int | None = None
    records: list[dict[str, Any]] = Field(default_factory=list)
    store_images: bool = False
    explain: bool = False

    @field_validator("records", mode="before")
    @classmethod
    def _records_are_objects(cls, value: Any) -> Any:
        if isinstance(value, list) and not all(isinstance(r, dict) for r in value):
            raise ValueError("every record must be a JSON object")
        return value


def _record_bytes(record: dict[str, Any], settings: Settings) -> bytes:
    if isinstance(record.get("_base64"), str) and record["_base64"]:
        data = decode_base64(record["_base64"])
    elif isinstance(record.get("_url"), str) and record["_url"]:
        data = fetch_image_bytes(record["_url"], settings.fetch_policy())
    else:
        raise BadRequestError("The record has neither '_url' nor '_base64'.", code="no_image")
    if len(data) > settings.max_upload_bytes:
        raise BadRequestError(
            f"The image is larger than {settings.max_upload_bytes} bytes.", code="too_large"
        )
    return data


@router.post("")
def classify(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    body: BodyDep,
    settings: SettingsDep,
    blobs: BlobsDep,
) -> Any:
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
    task = get_task(session, user, task_id)
    version = data.version if data.version is not None else task.production_version
    if version is None or version < 1:
        raise BadRequestError(
            f"Task '{task.name}' has no trained model version yet; train it first.", code="not_trained"
        )
    model = session.scalar(select(Model).where(Model.task_id == task.id, Model.version == version))
    if model is None or model.train_status != "TRAINED":
        raise NotFoundError(f"Task '{task.name}' has no trained version {version}.")
    results: list[dict[str, Any]] = [{k: v for k, v in r.items() if k != "_base64"} for r in data.records]
    raw: dict[int, bytes] = {}
    for i, record in enumerate(data.records):
        try:
            raw[i] = _record_bytes(record, settings)
        except TaskVisionError as exc:
            results[i]["_status"] = _error_status(exc)
    reconciler = request.app.state.reconciler
    if reconciler is not None and version == task.production_version:
        _classify_on_cluster(reconciler, task, raw, results, settings, explain=data.explain)
    else:
        _classify_in_process(request, task.id, version, model.bundle_uri, raw, results, explain=data.explain)
    if data.store_images:
        for i, data_bytes in raw.items():
            if results[i].get("_status", {}).get("code") == 200:
                results[i]["_stored_image_id"] = _store(
                    session, blobs, user, data_bytes, settings, data.records[i]
                )
    return {
        "task_id": task.id,
        "version": version,
        "records": results,
        "status": dict(OK),
        "statistics": {"processing time": round(time.perf_counter() - started, 5)},
    }


def _classify_in_process(
    request: Request,
    task_id: str,
    version: int,
    bundle_prefix: str,
    raw: dict[int, bytes],
    results: list[dict[str, Any]],
    *,
    explain: bool,
) -> None:
    """Embedded serving: the version's KServe predictor, hosted by this process."""
    predictor = request.app.state.serving.predictor(task_id, version, bundle_prefix)
    answers = predictor.classify(list(raw.values()), explain=explain) if raw else []
    for i, answer in zip(raw, answers, strict=True):
        if isinstance(answer, TaskVisionError):
            results[i]["_status"] = _error_status(answer)
        else:
            results[i].update(answer)
            results[i]["_status"] = dict(OK)


def _classify_on_cluster(
    reconciler: Any,
    task: Any,
    raw: dict[int, bytes],
    results: list[dict[str, Any]],
    settings: Settings,
    *,
    explain: bool,
) -> None:
    """Cluster serving: the task's InferenceService, over KServe's V1 protocol (``:explain`` to explain)."""
    try:
        endpoint = reconciler.endpoint(task.id)
    except KubernetesUnavailable as exc:
        raise ServiceUnavailableError(f"Serving of task '{task.name}' is unavailable: {exc}") from exc
    if not endpoint.ready:
        raise ServiceUnavailableError(
            f"The model of task '{task.name}' is starting (deploying, or scaled to zero); "
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
    verb = "explain" if explain else "predict"
    url = f"{str(endpoint.url).rstrip('/')}/v1/models/{endpoint.model_name}:{verb}"
    try:
        response = httpx.post(
            url, json={"instances": [{"b64": encoded[i]} for i in good]}, timeout=settings.isvc_timeout_s
        )
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(f"The model of task '{task.name}' did not answer: {exc}") from exc
    if response.status_code == 400:  # the predictor refused an image (e.g. corrupt pixel data)
        for i in good:
            results[i]["_status"] = {"code": 400, "text": str(response.json().get("error", "invalid image"))}
        return
    if response.status_code != 200:
        raise ServiceUnavailableError(
            f"The model of task '{task.name}' answered HTTP {response.status_code}."
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
