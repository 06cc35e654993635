"""Refuse, before routing, a URL that no handler could store or compare safely.

A NUL character (``%00``) in the path or the query would reach SQL as part of
an id or a filter, and PostgreSQL refuses NUL in text (a 500 from the driver).
No valid id, name or filter contains one, so such a request is a 400 here.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response


class RequestGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            query = scope.get("query_string", b"")
            if "\x00" in path or b"\x00" in unquote_to_bytes(query.replace(b"+", b" ")):
                response = error_response(400, "The URL contains a NUL character.", "bad_request")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
