"""Schemas of /recognition/v2/classify: the request and the Ximilar answer shape."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import Id, RequestBody, VersionNumber

MAX_RECORDS = 10


class ClassifyRecord(BaseModel):
    """One image: ``_base64`` or ``_url``. Any other fields are echoed back in its answer."""

    model_config = ConfigDict(extra="allow")

    base64: str | None = Field(
        default=None, alias="_base64", description="The image, base64 (or a data URI)."
    )
    url: str | None = Field(default=None, alias="_url", description="An http(s) URL the server fetches.")


class ClassifyRequest(RequestBody):
    task_id: Id | None = Field(default=None, description="The task (ximilar-client's name for it)...")
    task: Id | None = Field(default=None, description="...or this (the docs' name for it).")
    version: VersionNumber | None = Field(
        default=None, description="A trained version; default: the production one."
    )
    records: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=MAX_RECORDS,
        description="1 to 10 records, each a ClassifyRecord.",
        json_schema_extra={"items": {"$ref": "#/components/schemas/ClassifyRecord"}, "minItems": 1},
    )
    store_images: bool = Field(default=False, description="Keep each image as an unlabelled training image.")

    @field_validator("records", mode="before")
    @classmethod
    def _records_are_objects(cls, value: Any) -> Any:
        if isinstance(value, list) and not all(isinstance(r, dict) for r in value):
            raise ValueError("every record must be a JSON object")
        return value


class RecordStatus(BaseModel):
    code: int = Field(description="200, or the 4xx of this record alone.")
    text: str


class LabelScore(BaseModel):
    id: str
    name: str
    prob: float


class LabelValue(BaseModel):
    id: str
    name: str
    value: float


class ClassifiedRecord(BaseModel):
    """A record's answer: its own fields (without ``_base64``) and the prediction."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    status: RecordStatus = Field(alias="_status")
    best_label: LabelScore | list[LabelScore] | LabelValue | None = Field(
        default=None,
        description="multi_class: the top label; multi_label: the tags above their thresholds (or the "
        "negative label); regression: the value.",
    )
    labels: list[LabelScore] | list[LabelValue] | None = Field(
        default=None, description="Every label by probability (regression: every value)."
    )
    width: int | None = Field(default=None, alias="_width")
    height: int | None = Field(default=None, alias="_height")
    stored_image_id: str | None = Field(default=None, alias="_stored_image_id")


class ClassifyResponse(BaseModel):
    task_id: str
    version: int
    records: list[ClassifiedRecord]
    status: RecordStatus
    statistics: dict[str, float] = Field(description='{"processing time": seconds}')
