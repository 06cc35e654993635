"""/docs (Swagger UI) and /redoc, with every asset served from the installed package, not a CDN.

The JavaScript and CSS come from the ``fastapi-offline`` wheel (Swagger UI 5 and
ReDoc 2 bundles), mounted at ``/static/docs``, so the pages work on a machine
without internet access. Swagger UI keeps the token given to its Authorize
button across reloads (``persistAuthorization``).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/static/docs"
ASSETS = Path(fastapi_offline.__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
        # validatorUrl None: the page never calls the public swagger.io validator.
        swagger_ui_parameters={"persistAuthorization": True, "tryItOutEnabled": True, "validatorUrl": None},
    )


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
        with_google_fonts=False,
    )


def install(app: FastAPI) -> None:
    """The two pages and their assets (the app is created with docs_url=None, redoc_url=None)."""
    app.mount(STATIC_URL, StaticFiles(directory=ASSETS), name="docs-assets")
    app.include_router(router)
