"""An APIRouter that serves every path with and without a trailing slash.

``ximilar-client`` strips trailing slashes for GET/POST/PUT/PATCH but keeps
them for DELETE, and a redirect would turn its POSTs into GETs, so both forms
are real routes (the slash form is hidden from the OpenAPI document).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter


class SlashAgnosticRouter(APIRouter):
    def add_api_route(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        bare = path.rstrip("/")
        super().add_api_route(bare, endpoint, **kwargs)
        kwargs["include_in_schema"] = False
        super().add_api_route(bare + "/", endpoint, **kwargs)
