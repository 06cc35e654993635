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
    overall_progress: float = Field(description="Progress of the whole run, 0 to 1, across its steps.")
    eta_seconds: int | None = Field(description="Estimated seconds left (running runs).")
    queue_position: int | None = Field(description="1 = next to start (queued runs).")
    message: str
    error: str = Field(description="Why the run failed, in words (validation problems are listed).")
    version: int | None = Field(description="The model version it registered.")
    model_id: str | None = Field(description="The id of that model version (/recognition/v2/model/{id}).")
    params: dict[str, Any] = Field(description="The parameters as asked for.")
    effective_params: dict[str, Any] = Field(
        description="What the run used: the service's defaults filled in, and what its steps decided "
        "(the mode auto became, the split sizes, the chosen model)."
    )
    created: datetime
    started: datetime | None
    finished: datetime | None
