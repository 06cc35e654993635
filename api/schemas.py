"""Request and response schemas, separate from the ORM classes.

``XCreate``/``XUpdate`` validate what clients send; ``XPublic`` is what they get
back. Field names follow the Ximilar recognition v2 API exactly.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from taskvision.task_types import LabelType, TaskType


class _In(BaseModel):
    # Clients may send fields we do not use (ximilar-client adds "workspace"); ignore them.
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


# ---- tasks -----------------------------------------------------------------


class TaskCreate(_In):
    name: str = Field(min_length=1, max_length=255)
    type: TaskType = TaskType.MULTI_CLASS
    description: str = Field(default="", max_length=10_000)

    @field_validator("description", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return "" if v is None else v


class TaskUpdate(_In):
    name: str | None = Field(default=None, min_length=1, max_length=255)
    description: str | None = Field(default=None, max_length=10_000)
    production_version: int | None = None
    # Cluster mode: send a new production version to only this share of traffic first;
    # null promotes it to all traffic.
    canary_percent: int | None = Field(default=None, ge=1, le=99)


class LabelIdBody(_In):
    label_id: str = Field(min_length=1)


class TaskIdBody(_In):
    task_id: str = Field(min_length=1)


class LabelBrief(BaseModel):
    id: str
    name: str
    type: str
    output_name: str
    negative_for_task: bool


class TrainRequest(_In):
    """Optional training parameters (ximilar-client sends none)."""

    mode: Literal["auto", "embed", "finetune"] | None = None
    quality: Literal["fast", "balanced", "best"] | None = Field(
        default=None, description="CPU training: speed against accuracy (default: the server's, balanced)."
    )
    augment: Literal["none", "flip"] | None = None
    epochs: int | None = Field(default=None, ge=1, le=500)
    learning_rate: float | None = Field(default=None, gt=0, le=10)
    batch_size: int | None = Field(default=None, ge=1, le=1024)
    min_images_per_label: int | None = Field(default=None, ge=1, le=100_000)
    test_fraction: float | None = Field(default=None, gt=0, lt=1)
    seed: int | None = None
    production: bool = Field(default=True, description="Put the new version in production when it is ready.")


class TrainingRunPublic(BaseModel):
    id: str
    task: str
    status: str
    step: str
    progress: float
    message: str
    error: str
    version: int | None
    params: dict[str, Any]
    created: datetime
    started: datetime | None
    finished: datetime | None


class TaskPublic(BaseModel):
    id: str
    name: str
    type: str
    description: str
    production_version: int
    last_train_status: str
    last_train_error: str
    canary_percent: int | None = None
    serving_error: str = ""
    labels: list[LabelBrief]
    workspace: str
    created: datetime


# ---- labels ----------------------------------------------------------------


class LabelCreate(_In):
    name: str = Field(min_length=1, max_length=255)
    type: LabelType = LabelType.CATEGORY
    description: str = Field(default="", max_length=10_000)
    output_name: str = Field(default="", max_length=255)

    @field_validator("description", "output_name", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return "" if v is None else v


class LabelUpdate(_In):
    name: str | None = Field(default=None, min_length=1, max_length=255)
    description: str | None = Field(default=None, max_length=10_000)
    output_name: str | None = Field(default=None, max_length=255)


class TaskRef(BaseModel):
    id: str
    name: str


class LabelPublic(BaseModel):
    id: str
    name: str
    type: str
    description: str
    output_name: str
    negative_for_task: bool
    recognition_tasks: list[TaskRef]
    tasks_count: int
    images_count: int | None = None
    workspace: str
    created: datetime


# ---- training images ---------------------------------------------------------


class ImageCreate(_In):
    base64: str | None = None
    url: str | None = Field(default=None, max_length=4096)
    noresize: bool = False
    test_image: bool = False
    real: bool = False
    meta_data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("meta_data", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


class ImageLabelBody(_In):
    label_id: str = Field(min_length=1)
    value: float | None = None

    @field_validator("value")
    @classmethod
    def _check_value(cls, v: float | None) -> float | None:
        return _finite(v)


class ImageMetaUpdate(_In):
    meta_data: dict[str, Any] | None = None
    test_image: bool | None = None
    real: bool | None = None


class BulkImageUpdate(_In):
    """The body of ``POST /training-image/update`` (keys with dashes, as ximilar-client sends them)."""

    images: list[str] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    labels_add: list[str] = Field(default_factory=list, alias="labels-add")
    labels_remove: list[str] = Field(default_factory=list, alias="labels-remove")
    mark_test: bool = Field(default=False, alias="mark-test")
    unmark_test: bool = Field(default=False, alias="unmark-test")
    mark_real: bool = Field(default=False, alias="mark-real")
    unmark_real: bool = Field(default=False, alias="unmark-real")


class ImageLabelPublic(LabelBrief):
    value: float | None = None


class ImagePublic(BaseModel):
    id: str
    created: datetime
    img_path: str
    thumb_img_path: str
    img_width: int
    img_height: int
    meta_data: dict[str, Any]
    test_image: bool
    real: bool
    verifyCount: int
    labels: list[ImageLabelPublic]
    workspace: str


# ---- models and account ----------------------------------------------------------


class ModelPublic(BaseModel):
    id: str
    task: str
    task_name: str
    version: int
    train_status: str
    production: bool
    metrics: dict[str, Any]
    created: datetime


class UserPublic(BaseModel):
    id: str
    username: str
    workspace: str
    workspaces: list[dict[str, str]]
    created: datetime
