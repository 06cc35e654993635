"""/account/v2: the current user (ximilar-client calls /user; the docs name /details)."""

from __future__ import annotations

from typing import Any

from api.deps import CurrentUser
from api.http.routing import SlashAgnosticRouter
from api.schemas._all import UserPublic

router = SlashAgnosticRouter(prefix="/account/v2", tags=["account"])


def _user(user: CurrentUser) -> Any:
    return UserPublic(
        id=user.id,
        username=user.name,
        workspace=user.workspace_id,
        workspaces=[{"id": user.workspace_id, "name": "Default"}],
        created=user.created,
    ).model_dump(mode="json")


@router.get("/user")
def get_user(user: CurrentUser) -> Any:
    return _user(user)


@router.get("/details")
def get_details(user: CurrentUser) -> Any:
    return _user(user)
