"""Schemas of /recognition/v2/training-image: uploads, labels on images, bulk edits, the image as answered."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import Id, RequestBody, Text
from api.schemas.tasks import LabelBrief

# Ids in one bulk request (each becomes a SQL parameter).
MAX_BULK_IDS = 1000


class ImageCreate(RequestBody):
    """An upload as JSON: exactly one of ``base64`` and ``url`` (or, multipart, the file ``img_path``)."""

    base64: str | None = Field(
        default=None, description="The image, base64 (raw or as a data:image/...;base64, URI)."
    )
    url: Text | None = Field(
        default=None, max_length=4096, description="An http(s) URL the server fetches the image from."
    )
    noresize: bool = Field(
        default=False, description="Keep the original size (else the shorter side is 1024)."
    )
    test_image: bool = Field(default=False, description="Always put this image in the test split.")
    real: bool = False
    meta_data: dict[str, Any] | None = Field(
        default=None, description="Any JSON object, kept with the image."
    )

    @field_validator("meta_data", mode="after")
    @classmethod
    def _none_is_empty(cls, v: dict[str, Any] | None) -> dict[str, Any]:
        return v or {}


class ImageUpload(BaseModel):
    """An upload as multipart/form-data (what ``curl -F img_path=@photo.jpg`` sends)."""

    model_config = ConfigDict(extra="ignore")

    img_path: bytes = Field(json_schema_extra={"format": "binary"}, description="The image file.")
    noresize: bool = False
    test_image: bool = False
    real: bool = False
    meta_data: Text | None = Field(default=None, description="A JSON object, as text.")


class ImageLabelBody(RequestBody):
    label_id: Id
    value: float | None = Field(
        default=None, description="Value labels (regression) only: the image's value."
    )

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class ImageMetaUpdate(RequestBody):
    meta_data: dict[str, Any] | None = Field(default=None, description="Replaces the image's meta data.")
    test_image: bool | None = None
    real: bool | None = None


class BulkImageUpdate(RequestBody):
    """The body of ``POST /training-image/update`` (keys with dashes, as ximilar-client sends them)."""

    model_config = ConfigDict(populate_by_name=True)

    images: list[Id] = Field(
        default_factory=list, max_length=MAX_BULK_IDS, description="Select these images..."
    )
    labels: list[Id] = Field(
        default_factory=list,
        max_length=MAX_BULK_IDS,
        description="...and/or the images with any of these labels.",
    )
    labels_add: list[Id] = Field(default_factory=list, alias="labels-add", max_length=MAX_BULK_IDS)
    labels_remove: list[Id] = Field(default_factory=list, alias="labels-remove", max_length=MAX_BULK_IDS)
    mark_test: bool = Field(default=False, alias="mark-test")
    unmark_test: bool = Field(default=False, alias="unmark-test")
    mark_real: bool = Field(default=False, alias="mark-real")
    unmark_real: bool = Field(default=False, alias="unmark-real")


class BulkImageUpdated(BaseModel):
    updated: int
    images: list[str]


class ImageLabelPublic(LabelBrief):
    value: float | None = None


class ImagePublic(BaseModel):
    id: str
    created: datetime
    img_path: str = Field(description="Download link, signed: works without the token until it expires.")
    thumb_img_path: str
    img_width: int
    img_height: int
    meta_data: dict[str, Any]
    test_image: bool
    real: bool
    verifyCount: int
    labels: list[ImageLabelPublic]
    workspace: str


class ReviewItem(BaseModel):
    """An image for a person to look at, with what the task's model said about it.

    ``kind=uncertain``: a stored image waiting for a label, the most uncertain first.
    ``kind=disagreement``: a labelled image the model answers differently (a likely
    label error), the most confident disagreement first (regression: largest error).
    """

    kind: Literal["uncertain", "disagreement"] = "uncertain"
    image: ImagePublic
    version: int = Field(description="The model version that answered.")
    suggested: list[dict[str, Any]] = Field(
        description="The labels the model suggests ({id, name, prob}; regression: {id, name, value})."
    )
    labels: list[dict[str, Any]] = Field(description="Every label's probability (regression: the value).")
    uncertainty: float | None = Field(
        description="0 sure .. 1 unsure (the uncertain queue's order); null for a regression disagreement."
    )
    true_labels: list[dict[str, Any]] = Field(
        default=[], description="disagreement: the labels (or value) the image was evaluated with."
    )
    split: Literal["test", "train"] | None = Field(
        default=None, description="disagreement: the test split, or a training image answered out of fold."
    )
    error: float | None = Field(default=None, description="disagreement, regression: the absolute error.")
    predicted: datetime


class ReviewDecision(RequestBody):
    """Leave both out to accept the suggestion; else the labels (or value) to set instead."""

    label_ids: list[Id] | None = Field(
        default=None,
        max_length=MAX_BULK_IDS,
        description="multi_class: one label; multi_label: the tags (an empty list: none of them).",
    )
    value: float | None = Field(default=None, description="regression: the image's value.")
