"""Request bodies: JSON (what ximilar-client sends) or form fields (what the curl examples send).

Bodies are read with a size cap, so a client cannot make us buffer gigabytes,
and validated with pydantic into the schema the endpoint names.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from api.errors import RequestValidationFailed
from taskvision.errors import BadRequestError, PayloadTooLargeError

Schema = TypeVar("Schema", bound=BaseModel)


async def read_body(request: Request, *, max_bytes: int) -> dict[str, Any]:
    """Parse the request body into a dict. An empty body is ``{}``.

    Multipart file fields are returned as ``UploadFile`` objects.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"The request body is larger than {max_bytes} bytes.")
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_part_size=max_bytes)
        data: dict[str, Any] = {}
        for key, value in form.multi_items():
            data[key] = value
        return data
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(f"The request body is larger than {max_bytes} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"The body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(parsed, dict):
        raise BadRequestError("The body must be a JSON object.", code="invalid_json")
    return parsed


def parse(schema: type[Schema], data: dict[str, Any]) -> Schema:
    """Validate ``data`` against ``schema``; a failure answers 422 with every problem listed."""
    clean = {k: v for k, v in data.items() if not isinstance(v, UploadFile)}
    try:
        return schema.model_validate(clean)
    except ValidationError as exc:
        raise RequestValidationFailed(exc) from exc
