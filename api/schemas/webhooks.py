"""Schemas of /recognition/v2/webhook: a workspace's webhook endpoints and their deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from api.db.models import DeliveryStatus
from api.schemas.common import RequestBody, Text

Event = Literal["training.started", "training.succeeded", "training.failed", "version.production_changed"]


class WebhookCreate(RequestBody):
    url: Text = Field(
        min_length=8,
        max_length=2048,
        examples=["https://example.com/hooks/taskvision"],
        description="An http(s) URL; internal addresses are refused, as for image URLs.",
    )
    events: list[Event] = Field(
        default=["training.started", "training.succeeded", "training.failed", "version.production_changed"],
        min_length=1,
        max_length=4,
        description="What to be told about.",
    )


class WebhookPublic(BaseModel):
    id: str
    url: str
    events: list[str]
    created: datetime


class WebhookCreated(WebhookPublic):
    secret: str = Field(description="Signs every delivery (X-TaskVision-Signature); shown only now, keep it.")


class DeliveryPublic(BaseModel):
    id: str
    event: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None = Field(description="The target's last HTTP status.")
    last_error: str = Field(description="Why the last attempt failed (empty when it did not).")
    next_attempt: datetime | None
    created: datetime
    finished: datetime | None
    payload: dict[str, Any]
