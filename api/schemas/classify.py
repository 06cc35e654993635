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
    explain: bool = Field(
        default=False,
        description="Add to each record ``_explanations``: a heat map of where the image made the model "
        "give its best label (multi_label: each tag above its threshold; regression: the value).",
    )

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


class Explanation(BaseModel):
    """Where in the image one label's score came from (class activation map; see taskvision.explain)."""

    id: str
    name: str
    heatmap: str = Field(
        description="A grayscale PNG (data URI): the positive part of the map, 0-255, to draw stretched "
        "over heatmap_box."
    )
    heatmap_box: list[int] = Field(
        description="[left, top, right, bottom]: the centre crop the model saw, in the image's pixels."
    )
    top_region: list[int] = Field(
        description="[left, top, right, bottom]: the region around the map's peak (at least half of it)."
    )


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
    out_of_range: bool | None = Field(
        default=None, description="regression: the raw value fell outside the training range (clipped)."
    )
    explanations: list[Explanation] | None = Field(
        default=None, alias="_explanations", description="With explain: one heat map per explained label."
    )


class ClassifyResponse(BaseModel):
    task_id: str
    version: int
    records: list[ClassifiedRecord]
    status: RecordStatus
    statistics: dict[str, float] = Field(description='{"processing time": seconds}')
