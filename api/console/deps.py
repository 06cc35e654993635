"""Typed dependencies of the console pages: the signed-in viewer and the CSRF check.

A page names ``ViewerDep`` to require a session (without one the browser is sent
to the sign-in page and back); a state-changing route adds ``CsrfChecked``. The
services, settings and DB session come from ``api.deps`` as for the REST routes
(the console app carries the same ``Services`` in its state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.console.security import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    SessionClaims,
    SessionCodec,
    origin_allowed,
)
from api.db.models import ApiToken, User
from api.deps import ServicesDep, SessionDep
from api.http.body import is_form
from taskvision.errors import TaskVisionError


class SignInRequired(Exception):
    """No valid session: the handler sends the browser to the sign-in page (and back afterwards)."""


class CsrfRefused(TaskVisionError, PermissionError):
    """403: a state-changing request without this session's CSRF token, or from another site."""

    status = 403
    code = "csrf_failed"


@dataclass(frozen=True)
class Viewer:
    """The signed-in user of a console request."""

    user: User
    token: ApiToken
    claims: SessionClaims
    csrf: str

    @property
    def workspace_id(self) -> str:
        return self.user.workspace_id


def get_codec(request: Request) -> SessionCodec:
    codec: SessionCodec = request.app.state.console_codec
    return codec


CodecDep = Annotated[SessionCodec, Depends(get_codec)]


def read_viewer(request: Request, session: Session, codec: SessionCodec) -> Viewer | None:
    """The session's viewer, or None (no cookie, a bad one, or its token was rotated)."""
    value = request.cookies.get(SESSION_COOKIE)
    claims = codec.read(value) if value else None
    if claims is None:
        return None
    token = session.get(ApiToken, claims.token_id)
    if token is None:
        return None
    return Viewer(user=token.user, token=token, claims=claims, csrf=codec.csrf_token(claims.session_id))


def current_viewer(request: Request, session: SessionDep, services: ServicesDep, codec: CodecDep) -> Viewer:
    """The signed-in viewer, after the token's request allowance is spent (the same bucket as REST)."""
    viewer = read_viewer(request, session, codec)
    if viewer is None:
        raise SignInRequired()
    services.rate_limits.take(viewer.token.token_hash)
    return viewer


ViewerDep = Annotated[Viewer, Depends(current_viewer)]


async def check_csrf(request: Request, viewer: ViewerDep, codec: CodecDep) -> None:
    """Refuse a state-changing request that does not carry this session's CSRF token."""
    if not origin_allowed(request.headers.get("origin"), _host_url(request)):
        raise CsrfRefused("This request came from another site.")
    presented = request.headers.get(CSRF_HEADER)
    if not presented and is_form(request):
        form = await request.form()
        field = form.get(CSRF_FIELD)
        presented = field if isinstance(field, str) else None
    if not codec.csrf_ok(viewer.claims.session_id, presented):
        raise CsrfRefused(
            "The form has expired or did not come from this console; reload the page and retry."
        )


def _host_url(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


CsrfChecked = Depends(check_csrf)
