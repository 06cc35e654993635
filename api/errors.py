"""The one table that turns exceptions into JSON error responses.

Every response is JSON, errors included: ``{"detail": "...", "code": "..."}``.
``ximilar-client`` parses ``detail``; ``code`` is stable for programs.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from taskvision.errors import TaskVisionError

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "validation_error",
}


class RequestValidationFailed(TaskVisionError, ValueError):
    """422: the body does not match the endpoint's schema."""

    status = 422
    code = "validation_error"

    def __init__(self, error: ValidationError) -> None:
        self.errors = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in error.errors(include_url=False, include_input=False)
        ]
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in self.errors]
        super().__init__("Invalid request: " + "; ".join(parts))


def error_response(status: int, detail: str, code: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Token"} if status == 401 else None
    return JSONResponse({"detail": detail, "code": code, **extra}, status_code=status, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """The methods of the routes that own this path (a path can have one route per method).

    Where both a fixed path and a templated one match (``/training-image/update`` and
    ``/training-image/{image_id}``), the fixed one owns it, as in the OpenAPI document.
    """
    path = request.url.path
    by_params: dict[int, set[str]] = {}
    for route in iter_route_contexts(request.app.routes):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            by_params.setdefault(len(route.param_convertors), set()).update(route.methods or ())
    methods = by_params[min(by_params)] if by_params else set()
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TaskVisionError)
    async def _taskvision(_: Request, exc: TaskVisionError) -> JSONResponse:
        extra: dict[str, Any] = dict(exc.extra)
        if isinstance(exc, RequestValidationFailed):
            extra["errors"] = exc.errors
        image_id = getattr(exc, "image_id", None)
        if image_id:
            extra["id"] = image_id
        response = error_response(exc.status, exc.detail, exc.code, **extra)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            response.headers["Retry-After"] = str(retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors]
        return error_response(422, "Invalid request: " + "; ".join(parts), "validation_error", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(exc.status_code, str(exc.detail), _HTTP_CODES.get(exc.status_code, "error"))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "Internal server error.", "internal_error")
