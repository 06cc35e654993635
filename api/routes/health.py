"""Liveness and readiness probes (no token needed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> Any:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(services: ServicesDep) -> Any:
    """The database answers and the blob store is reachable."""
    problems: dict[str, str] = {}
    try:
        with services.session_factory() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        problems["database"] = str(exc)
    try:
        services.blobs.exists("readyz-probe")
    except Exception as exc:
        problems["storage"] = str(exc)
    if problems:
        return JSONResponse(
            {"status": "unavailable", "detail": "Not ready.", "code": "unavailable", "problems": problems},
            status_code=503,
        )
    return {"status": "ok"}
