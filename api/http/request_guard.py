"""Refuse, before routing, a URL that no handler could store or compare safely.

A NUL character (``%00``) in the path or the query would reach SQL as part of
an id or a filter, and PostgreSQL refuses NUL in text (a 500 from the driver).
No valid id, name or filter contains one, so such a request is a 400 here.

No path holds any other control character either: paths carry ids and
versions. One matters for routing: Starlette matches a route's pattern with
``$``, which also matches before a final newline, so ``/webhook/%0A`` was
served as the list ``/webhook/`` (found by schemathesis). A path with a
control character (U+0000-U+001F, U+007F) is a 400 too.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RequestGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            query = scope.get("query_string", b"")
            message = None
            if _CONTROL.search(path):
                message = "The URL's path contains a control character."
            elif b"\x00" in unquote_to_bytes(query.replace(b"+", b" ")):
                message = "The URL contains a NUL character."
            if message is not None:
                await error_response(400, message, "bad_request")(scope, receive, send)
                return
        await self.app(scope, receive, send)
