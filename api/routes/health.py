"""Liveness and readiness probes (no token needed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from api.deps import ServicesDep

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class NotReady(BaseModel):
    status: str
    detail: str
    code: str
    problems: dict[str, str]


@router.get("/healthz", response_model=Health)
def healthz() -> Any:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=Health, responses={503: {"model": NotReady, "description": "Not ready."}}
)
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
