"""An APIRouter that serves every path with and without a trailing slash, and documents bodies.

``ximilar-client`` strips trailing slashes for GET/POST/PUT/PATCH but keeps
them for DELETE, and a redirect would turn its POSTs into GETs, so both forms
are real routes (the slash form is hidden from the OpenAPI document).

An endpoint that takes a body through :func:`api.deps.body_of` gets that
body's ``requestBody`` in the document (JSON, and form fields where accepted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from api.http.openapi import body_model_of


class SlashAgnosticRouter(APIRouter):
    def add_api_route(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        body = body_model_of(endpoint)
        if body is not None:
            kwargs["openapi_extra"] = {**body, **(kwargs.get("openapi_extra") or {})}
        bare = path.rstrip("/")
        super().add_api_route(bare, endpoint, **kwargs)
        kwargs["include_in_schema"] = False
        super().add_api_route(bare + "/", endpoint, **kwargs)
