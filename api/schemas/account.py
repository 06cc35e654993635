"""Schemas of /account/v2: the caller."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class WorkspaceRef(BaseModel):
    id: str
    name: str


class UserPublic(BaseModel):
    id: str
    username: str
    workspace: str
    workspaces: list[WorkspaceRef]
    created: datetime
