"""ORM classes. The schema itself is owned by the Alembic migrations in ``api/migrations``.

Every row that a user owns carries ``workspace_id``; queries always filter on
it, so another tenant's object is indistinguishable from a missing one.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class RunStatus(StrEnum):
    """Where a training run is. STARTING and FINISHING are held while one control-plane
    replica submits or registers the run, so that two replicas never do it twice."""

    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    FINISHING = "FINISHING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"

    @classmethod
    def active(cls) -> tuple[RunStatus, ...]:
        """A run in one of these holds its task (one training at a time) and its snapshot's blobs."""
        return (cls.QUEUED, cls.STARTING, cls.RUNNING, cls.FINISHING)

    @classmethod
    def ended(cls) -> tuple[RunStatus, ...]:
        return (cls.SUCCEEDED, cls.FAILED, cls.CANCELED)


class TrainStatus(StrEnum):
    """A task's ``last_train_status`` (the Ximilar values), and a model version's ``train_status``."""

    NOT_TRAINED = "NOT_TRAINED"
    IN_TRAINING = "IN_TRAINING"
    TRAINED = "TRAINED"
    TRAINING_FAILED = "TRAINING_FAILED"


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; use datetime.now(UTC)")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(150), unique=True)
    workspace_id: Mapped[str] = mapped_column(String(36), unique=True, default=new_id)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", cascade="all, delete-orphan")


class ApiToken(Base):
    """An API token, stored as its SHA-256 (tokens are 256-bit random, so no salt/KDF is needed)."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(8))
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    user: Mapped[User] = relationship(back_populates="tokens")


class InstanceSecret(Base):
    """Secrets the service generates for itself (e.g. the download-link signing key)."""

    __tablename__ = "instance_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TaskLabel(Base):
    __tablename__ = "task_labels"

    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    label_id: Mapped[str] = mapped_column(
        ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(20))
    description: Mapped[str] = mapped_column(Text, default="")
    production_version: Mapped[int] = mapped_column(Integer, default=-1)
    last_train_status: Mapped[str] = mapped_column(String(32), default=TrainStatus.NOT_TRAINED)
    last_train_error: Mapped[str] = mapped_column(Text, default="")
    # Cluster mode: the share of traffic a new production version gets before promotion (None: all),
    # what the task's InferenceService was last set to ("<version>:<canary>"), and the last error.
    canary_percent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    served_spec: Mapped[str] = mapped_column(String(64), default="")
    serving_error: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    labels: Mapped[list[Label]] = relationship(
        secondary="task_labels", order_by="TaskLabel.created", viewonly=True
    )


class Label(Base):
    __tablename__ = "labels"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(20))
    description: Mapped[str] = mapped_column(Text, default="")
    output_name: Mapped[str] = mapped_column(String(255), default="")
    negative_for_task: Mapped[str | None] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), nullable=True, index=True
    )
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    tasks: Mapped[list[Task]] = relationship(secondary="task_labels", viewonly=True)


class TrainingImage(Base):
    """A stored image. ``sha256`` is of the stored bytes; one row per content per workspace."""

    __tablename__ = "training_images"
    __table_args__ = (
        UniqueConstraint("workspace_id", "sha256", name="uq_training_images_workspace_sha256"),
        # Listing pages walk this index in order instead of sorting the workspace's rows.
        Index("ix_training_images_workspace_created", "workspace_id", "created", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(String(36))
    sha256: Mapped[str] = mapped_column(String(64))
    blob_key: Mapped[str] = mapped_column(String(255))
    thumb_key: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    meta_data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    test_image: Mapped[bool] = mapped_column(Boolean, default=False)
    real: Mapped[bool] = mapped_column(Boolean, default=False)
    verify_count: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    label_links: Mapped[list[ImageLabel]] = relationship(
        back_populates="image", cascade="all, delete-orphan", order_by="ImageLabel.created"
    )


class PendingBlobDeletion(Base):
    """A deleted image's content whose blobs are to go once nothing needs them (api/blob_gc.py)."""

    __tablename__ = "pending_blob_deletions"

    workspace_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    requested: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class ImageLabel(Base):
    """A label on an image; ``value`` is set for regression (value) labels."""

    __tablename__ = "image_labels"

    image_id: Mapped[str] = mapped_column(
        ForeignKey("training_images.id", ondelete="CASCADE"), primary_key=True
    )
    label_id: Mapped[str] = mapped_column(
        ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    image: Mapped[TrainingImage] = relationship(back_populates="label_links")
    label: Mapped[Label] = relationship(lazy="joined")


class Model(Base):
    """A trained model version of a task (filled by the training pipeline's run watcher)."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("task_id", "version", name="uq_models_task_version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(String(36), index=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    train_status: Mapped[str] = mapped_column(String(32), default=TrainStatus.TRAINED)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    bundle_uri: Mapped[str] = mapped_column(String(1024), default="")
    # The training run that made it (None for an imported bundle).
    run_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    task: Mapped[Task] = relationship(lazy="joined")


class TrainingRun(Base):
    """One training of a task: queued, running the pipeline, then succeeded (a version) or failed (why)."""

    __tablename__ = "training_runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(String(36), index=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.QUEUED, index=True)
    runner: Mapped[str] = mapped_column(String(16))
    handle: Mapped[str] = mapped_column(String(255), default="")  # the runner's id (a KFP run id)
    snapshot_prefix: Mapped[str] = mapped_column(String(255))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # as asked for
    # What the run actually used: the service's defaults filled in, and what its steps resolved
    # (the mode "auto" became, the split sizes, the chosen model).
    effective_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    step: Mapped[str] = mapped_column(String(32), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ImagePrediction(Base):
    """What a task's model answered for a stored image (classify with store_images): the review queue."""

    __tablename__ = "image_predictions"
    __table_args__ = (Index("ix_image_predictions_task_uncertainty", "task_id", "uncertainty"),)

    image_id: Mapped[str] = mapped_column(
        ForeignKey("training_images.id", ondelete="CASCADE"), primary_key=True
    )
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    answer: Mapped[dict[str, Any]] = mapped_column(JSON)  # best_label, labels (as classify answered)
    uncertainty: Mapped[float] = mapped_column(Float)  # 0 sure .. 1 unsure
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookEndpoint(Base):
    """A URL of a workspace that is told about its trainings and production switches."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(String(36), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(128))  # signs deliveries (HMAC-SHA256)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DeliveryStatus(StrEnum):
    PENDING = "PENDING"  # waiting for its next attempt
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # no 2xx within the retry window


class WebhookDelivery(Base):
    """One event sent (or being retried) to one endpoint."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True
    )
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    next_attempt: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
