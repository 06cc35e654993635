"""Schemas of /recognition/v2/label: labels (category / tag / value) shared by tasks and images."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field, field_validator

from api.schemas.common import Id, Name, RequestBody, Text, strict_enum
from taskvision.task_types import LabelType


class LabelCreate(RequestBody):
    name: Name = Field(examples=["bedroom"])
    type: Annotated[LabelType, strict_enum(LabelType)] = Field(
        default=LabelType.CATEGORY,
        description="category (multi_class), tag (multi_label), value (regression).",
    )
    description: Text | None = Field(default="", max_length=10_000)
    output_name: Text | None = Field(
        default="", max_length=255, description="Shown in answers; default: name."
    )

    @field_validator("description", "output_name", mode="after")
    @classmethod
    def _none_is_empty(cls, v: str | None) -> str:
        return v or ""


class LabelUpdate(RequestBody):
    name: Name | None = None
    description: Text | None = Field(default=None, max_length=10_000)
    output_name: Text | None = Field(default=None, max_length=255)


class TaskIdBody(RequestBody):
    task_id: Id


class TaskRef(BaseModel):
    id: str
    name: str


class LabelPublic(BaseModel):
    id: str
    name: str
    type: LabelType
    description: str
    output_name: str
    negative_for_task: bool = Field(description="The 'none of the tags' label of a tagging task.")
    recognition_tasks: list[TaskRef]
    tasks_count: int
    images_count: int | None = None
    workspace: str
    created: datetime


class LabelWiped(BaseModel):
    id: str
    removed_from_images: int
