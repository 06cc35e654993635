"""Typed FastAPI dependencies: the settings, a DB session, the blob store, the current user."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.auth import authenticate, token_key
from api.body import read_body
from api.db.models import User
from api.settings import Settings
from taskvision.errors import NotFoundError
from taskvision.storage import BlobStore


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_blobs(request: Request) -> BlobStore:
    blobs: BlobStore = request.app.state.blobs
    return blobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_db)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]


async def get_body(request: Request, settings: SettingsDep) -> dict[str, Any]:
    # base64 inflates by 4/3; leave room for the JSON around it.
    limit = settings.max_upload_bytes * 4 // 3 + 1024 * 1024
    return await read_body(request, max_bytes=limit)


BodyDep = Annotated[dict[str, Any], Depends(get_body)]


def _check_workspace(user: User, workspace: Any) -> None:
    """ximilar-client names a workspace when it is not "Default"; it must be the user's own."""
    if workspace in (None, "", "Default", user.workspace_id):
        return
    raise NotFoundError("Workspace not found.")


def get_current_user(request: Request, session: SessionDep) -> User:
    """The token's user, after its request-rate allowance is spent (429 beyond it)."""
    authorization = request.headers.get("authorization")
    user = authenticate(session, authorization)
    request.app.state.rate_limits.take(token_key(authorization))
    _check_workspace(user, request.query_params.get("workspace"))
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def check_body_workspace(user: User, body: dict[str, Any]) -> None:
    _check_workspace(user, body.get("workspace"))
