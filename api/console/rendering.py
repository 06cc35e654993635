"""Rendering pages: the Jinja2 environment (every value escaped), page responses, flash messages.

Templates autoescape everything (task, label and file names, meta data, error
messages); nothing user-supplied is ever marked safe. A flash message (what the
last action did) rides on a short cookie through the redirect that follows a
form post, and is shown once by the next page.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from api.console.deps import Viewer
from api.console.security import COOKIE_PATH, FLASH_COOKIE

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
PREFIX = COOKIE_PATH  # every console URL starts here
MAX_FLASH_CHARS = 600
MISSING = "\u2013"  # an en dash: no value


@cache
def _static_version(path: str) -> str:
    """A short hash of a static file, so that a new release is never served from a stale cache."""
    try:
        return hashlib.sha256((STATIC_DIR / path).read_bytes()).hexdigest()[:10]
    except OSError:
        return "0"


def static_url(path: str) -> str:
    return f"{PREFIX}/static/{path}?v={_static_version(path)}"


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """'3 min ago', '2 h ago', '4 days ago' (or the date after a month)."""
    if moment is None:
        return "never"
    now = now or datetime.now(UTC)
    seconds = max(0.0, (now - moment).total_seconds())
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    if seconds < 30 * 86400:
        days = int(seconds // 86400)
        return f"{days} day{'s' if days > 1 else ''} ago"
    return moment.strftime("%Y-%m-%d")


def iso(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else ""


def utc(moment: int | float | datetime) -> str:
    """A moment (a datetime or Unix time) as '2026-12-03 14:05 UTC'."""
    when = moment if isinstance(moment, datetime) else datetime.fromtimestamp(moment, UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def number(value: Any, digits: int = 3) -> str:
    """A metric for people: 0.9375 -> '0.938'; missing or not a number -> an en dash."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return MISSING
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def percent(value: Any, digits: int = 0) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return MISSING
    return f"{100 * value:.{digits}f} %"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    return f"{count:,} {singular if count == 1 else (plural_form or singular + 's')}"


@cache
def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(static=static_url, base=PREFIX)
    env.filters.update(
        ago=ago, iso=iso, utc=utc, number=number, percent=percent, duration=duration, plural=plural
    )
    return env


def _read_flashes(request: Request) -> list[tuple[str, str]]:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return []
    try:
        items = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        return [(str(kind), str(text)) for kind, text in items][:5]
    except (ValueError, TypeError):
        return []


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    viewer: Viewer | None = None,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """A page (or an htmx fragment): the template with the viewer, its CSRF token and any flash."""
    flashes = _read_flashes(request)
    values = {
        "request_path": request.url.path,
        "viewer": viewer,
        "csrf": viewer.csrf if viewer else "",
        "flashes": flashes,
        **(context or {}),
    }
    html = environment().get_template(template).render(values)
    response = HTMLResponse(html, status_code=status_code, headers=dict(headers or {}))
    response.headers["Cache-Control"] = "no-store"
    if flashes:
        response.delete_cookie(FLASH_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response


def redirect(request: Request, url: str, *, flash: tuple[str, str] | None = None) -> Response:
    """303 to ``url`` after a form post (an htmx request is told to go there with HX-Redirect)."""
    response: Response
    if request.headers.get("hx-request"):
        response = Response(status_code=204, headers={"HX-Redirect": url})
    else:
        response = RedirectResponse(url, status_code=303)
    if flash is not None:
        set_flash(request, response, *flash)
    return response


def set_flash(request: Request, response: Response, kind: str, text: str) -> None:
    """Show ``text`` once on the next page (kind: ok or error)."""
    value = base64.urlsafe_b64encode(json.dumps([[kind, text[:MAX_FLASH_CHARS]]]).encode()).decode()
    response.set_cookie(
        FLASH_COOKIE,
        value.rstrip("="),
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=120,
    )
