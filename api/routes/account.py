"""/account/v2: the current user (ximilar-client calls /user; the docs name /details)."""

from __future__ import annotations

from api.db.models import User
from api.deps import CurrentUser
from api.http.openapi import errors
from api.http.routing import SlashAgnosticRouter
from api.schemas.account import UserPublic, WorkspaceRef

router = SlashAgnosticRouter(prefix="/account/v2", tags=["account"], responses=errors(401, 429))


def _user(user: User) -> UserPublic:
    return UserPublic(
        id=user.id,
        username=user.name,
        workspace=user.workspace_id,
        workspaces=[WorkspaceRef(id=user.workspace_id, name="Default")],
        created=user.created,
    )


@router.get("/user", response_model=UserPublic)
def get_user(user: CurrentUser) -> UserPublic:
    """The user the token belongs to, and its workspace."""
    return _user(user)


@router.get("/details", response_model=UserPublic)
def get_details(user: CurrentUser) -> UserPublic:
    return _user(user)
