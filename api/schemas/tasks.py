"""Schemas of /recognition/v2/task: create, update, train, and the task as answered."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from api.db.models import TrainStatus
from api.schemas.common import INT32_MAX, Id, Name, RequestBody, Text, VersionNumber, WholeNumber, strict_enum
from api.schemas.runs import TrainingRunPublic
from taskvision.task_types import TaskType


class TaskCreate(RequestBody):
    name: Name = Field(examples=["Rooms"])
    type: Annotated[TaskType, strict_enum(TaskType)] = Field(
        default=TaskType.MULTI_CLASS, description="What the task predicts."
    )
    description: Text | None = Field(default="", max_length=10_000)

    @field_validator("description", mode="after")
    @classmethod
    def _none_is_empty(cls, v: str | None) -> str:
        return v or ""


class TaskUpdate(RequestBody):
    name: Name | None = None
    description: Text | None = Field(default=None, max_length=10_000)
    production_version: VersionNumber | None = Field(
        default=None, description="Serve this trained version from now on."
    )
    canary_percent: Annotated[int, Field(ge=1, le=99), WholeNumber] | None = Field(
        default=None,
        description="Cluster mode: send a new production version only this share of the traffic first; "
        "null promotes it to all of it.",
    )


class LabelIdBody(RequestBody):
    label_id: Id


class LabelBrief(BaseModel):
    id: str
    name: str
    type: str
    output_name: str
    negative_for_task: bool


class TaskPublic(BaseModel):
    id: str
    name: str
    type: TaskType
    description: str
    production_version: int = Field(description="The version classify answers with; -1 before the first.")
    last_train_status: TrainStatus
    last_train_error: str
    canary_percent: int | None = None
    serving_error: str = Field(default="", description="Cluster mode: why the task's model is not served.")
    labels: list[LabelBrief]
    workspace: str
    created: datetime


class TrainRequest(RequestBody):
    """Optional training parameters (ximilar-client sends none)."""

    mode: Literal["auto", "embed", "finetune"] | None = Field(
        default=None,
        description="embed: frozen backbone and a fitted head (CPU); finetune: end to end (GPU); "
        "auto: finetune when the trainer has a GPU.",
    )
    quality: Literal["fast", "balanced", "best"] | None = Field(
        default=None,
        description="CPU training: speed against accuracy: fast (one backbone), balanced (the default: "
        "model selection within about 30 s for 600 images), best (minutes, more candidates).",
    )
    augment: Literal["none", "flip"] | None = None
    epochs: Annotated[int, Field(ge=1, le=500), WholeNumber] | None = Field(
        default=None, description="Fine-tuning only."
    )
    learning_rate: float | None = Field(default=None, gt=0, le=10, description="Fine-tuning only.")
    batch_size: Annotated[int, Field(ge=1, le=1024), WholeNumber] | None = Field(
        default=None, description="Fine-tuning only."
    )
    min_images_per_label: Annotated[int, Field(ge=1, le=100_000), WholeNumber] | None = Field(default=None)
    test_fraction: float | None = Field(default=None, gt=0, lt=1)
    seed: Annotated[int, Field(ge=0, le=INT32_MAX), WholeNumber] | None = Field(default=None)
    production: bool = Field(default=True, description="Put the new version in production when it is ready.")
    reselect: bool | None = Field(
        default=None,
        description="Score every candidate model again, even when so little changed since the current "
        "version's selection (at most 10 % of the images) that its choice would be refitted.",
    )

    def parameters(self) -> dict[str, Any]:
        """What the run records as asked for (unset options take the service's defaults)."""
        return self.model_dump(exclude_none=True)


class TrainAccepted(TrainingRunPublic):
    task_status: TrainStatus = Field(description="The task's last_train_status: IN_TRAINING.")
