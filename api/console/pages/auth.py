"""Sign in (the API token for a session cookie) and sign out."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from api.auth import hash_token
from api.console.deps import CodecDep, CsrfChecked, CsrfRefused, ViewerDep, read_viewer
from api.console.rendering import PREFIX, redirect, render
from api.console.security import (
    COOKIE_PATH,
    SESSION_COOKIE,
    SIGN_IN_COOKIE,
    new_sign_in_value,
    origin_allowed,
    safe_next,
    same_value,
)
from api.db.models import ApiToken
from api.deps import ServicesDep, SessionDep

router = APIRouter()

HOME = f"{PREFIX}/tasks"
MAX_TOKEN_CHARS = 200


def _sign_in_page(request: Request, *, next_url: str, error: str = "", status_code: int = 200) -> Response:
    value = new_sign_in_value()
    response = render(
        request,
        "sign_in.html",
        {"next": next_url, "form_token": value, "error": error},
        status_code=status_code,
    )
    response.set_cookie(
        SIGN_IN_COOKIE,
        value,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=3600,
    )
    return response


@router.get("/sign-in")
def sign_in_form(request: Request, session: SessionDep, codec: CodecDep, next: str | None = None) -> Response:
    target = safe_next(next, HOME)
    if read_viewer(request, session, codec) is not None:
        return redirect(request, target)
    return _sign_in_page(request, next_url=target)


@router.post("/sign-in")
async def sign_in(request: Request, session: SessionDep, services: ServicesDep, codec: CodecDep) -> Response:
    """Exchange the API token for a session cookie; a wrong token is told so, and nothing is set."""
    form = await request.form()
    target = safe_next(str(form.get("next") or ""), HOME)
    if not origin_allowed(request.headers.get("origin"), f"{request.url.scheme}://{request.url.netloc}"):
        raise CsrfRefused("This request came from another site.")
    if not same_value(request.cookies.get(SIGN_IN_COOKIE), str(form.get("form_token") or "")):
        return _sign_in_page(
            request, next_url=target, error="The form had expired; enter the token again.", status_code=400
        )
    token = str(form.get("token") or "").strip()
    if token.lower().startswith(("token ", "bearer ")):
        token = token.split(None, 1)[1].strip()  # pasted with its scheme, as in the curl examples
    row = None
    if token and len(token) <= MAX_TOKEN_CHARS and token.isascii():
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    if row is None:
        return _sign_in_page(
            request, next_url=target, error="That is not a valid API token.", status_code=401
        )
    services.rate_limits.take(row.token_hash)
    value, _ = codec.issue(row.id)
    response = redirect(request, target)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        path=COOKIE_PATH,
        max_age=codec.ttl_s,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    response.delete_cookie(SIGN_IN_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response


@router.post("/sign-out", dependencies=[CsrfChecked])
def sign_out(request: Request, viewer: ViewerDep, codec: CodecDep) -> Response:
    codec.revoke(viewer.claims)
    response = redirect(request, f"{PREFIX}/sign-in", flash=("ok", "You are signed out."))
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response
