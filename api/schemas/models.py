"""Schemas of /recognition/v2/model: a task's trained model versions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from api.db.models import TrainStatus


class ModelPublic(BaseModel):
    id: str
    task: str
    task_name: str
    version: int
    train_status: TrainStatus
    production: bool = Field(description="Whether classify answers with this version by default.")
    metrics: dict[str, Any] = Field(description="The evaluation on the test split.")
    run_id: str | None = Field(description="The training run that made it (null: an imported bundle).")
    created: datetime
