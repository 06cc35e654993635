"""Schemas of /recognition/v2/training-run: a training of a task, where it is and how it ended."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from api.db.models import RunStatus


class TrainingRunPublic(BaseModel):
    id: str
    task: str
    status: RunStatus
    step: str = Field(description="The pipeline step running: validate, split, train, evaluate, register.")
    progress: float = Field(description="The current step's progress, 0 to 1.")
    message: str
    error: str = Field(description="Why the run failed, in words (validation problems are listed).")
    version: int | None = Field(description="The model version it registered.")
    params: dict[str, Any]
    created: datetime
    started: datetime | None
    finished: datetime | None
