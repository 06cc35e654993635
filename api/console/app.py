"""The console as a mounted application: its pages, static files, HTML error pages and security headers.

:func:`install` mounts it at ``/console`` on the control plane and sends ``/``
there. Being an application of its own, its errors are pages (a 404 page for
another workspace's task, image or version), while the REST API keeps its JSON
errors; every console response carries the Content-Security-Policy and the
other headers of :mod:`api.console.security`, and a ``Server-Timing`` header
with the server's time for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.console.deps import SignInRequired, read_viewer
from api.console.pages import account, auth, images, labels, review, tasks, training, try_it, versions
from api.console.rendering import PREFIX, STATIC_DIR, render
from api.console.security import SECURITY_HEADERS, SessionCodec
from api.errors import RequestValidationFailed
from api.services.container import Services
from api.services.signing import load_signing_key
from taskvision.errors import TaskVisionError

logger = logging.getLogger(__name__)

HOME = f"{PREFIX}/tasks"
_TITLES = {
    400: "That did not work",
    401: "Sign in again",
    403: "Not allowed",
    404: "Not found",
    405: "Not allowed",
    409: "Not now",
    413: "Too large",
    422: "Check the form",
    429: "Slow down",
    503: "Not ready",
}


def build_console(services: Services) -> FastAPI:
    """The console application (mounted at ``/console``)."""
    console = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    console.state.services = services
    key = load_signing_key(services.settings, services.session_factory)
    console.state.console_codec = SessionCodec(key, ttl_s=services.settings.console_session_ttl_s)

    @console.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
        return response

    for module in (auth, tasks, labels, images, training, review, versions, try_it, account):
        console.include_router(module.router)
    console.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _register_error_pages(console)
    return console


def _error_page(request: Request, status: int, message: str) -> Response:
    response: Response
    services: Services = request.app.state.services
    try:
        with services.session_factory() as session:
            viewer = read_viewer(request, session, request.app.state.console_codec)
            response = render(
                request,
                "error.html",
                {"status": status, "title": _TITLES.get(status, "Something went wrong"), "message": message},
                viewer=viewer,
                status_code=status,
            )
    except Exception:  # the error page must not fail in turn (e.g. the database is down)
        logger.exception("could not render the error page")
        response = Response(message, status_code=status, media_type="text/plain")
    return response


def _register_error_pages(console: FastAPI) -> None:
    @console.exception_handler(SignInRequired)
    async def _sign_in(request: Request, _: SignInRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            target = request.headers.get("referer", "") or HOME
            target = target if target.startswith(PREFIX) else HOME
        url = f"{PREFIX}/sign-in?next={quote(target, safe='')}"
        if request.headers.get("hx-request"):
            return Response(status_code=204, headers={"HX-Redirect": url})
        return RedirectResponse(url, status_code=303)

    @console.exception_handler(TaskVisionError)
    async def _known(request: Request, exc: TaskVisionError) -> Response:
        if isinstance(exc, RequestValidationFailed):
            message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors)
            return _error_page(request, 422, message)
        return _error_page(request, exc.status, exc.detail)

    @console.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error_page(request, 422, message)

    @console.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return _error_page(request, 404, "There is no such page in this console.")
        return _error_page(request, exc.status_code, str(exc.detail))

    @console.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("console error on %s %s", request.method, request.url.path)
        return _error_page(request, 500, "Something went wrong on our side; it has been logged.")


def install(app: FastAPI, services: Services) -> None:
    """Mount the console at ``/console`` and send visitors of ``/`` there."""
    app.mount(PREFIX, build_console(services), name="console")

    async def to_console() -> RedirectResponse:
        return RedirectResponse(HOME, status_code=307)

    app.add_api_route("/", to_console, methods=["GET"], include_in_schema=False)
    app.add_api_route(PREFIX, to_console, methods=["GET"], include_in_schema=False)
