"""Initial schema: users, tokens, tasks, labels, training images, models.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _ts(name: str = "created") -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(150), nullable=False, unique=True),
        sa.Column("workspace_id", sa.String(36), nullable=False, unique=True),
        _ts(),
    )
    op.create_table(
        "instance_secrets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
        _ts(),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("user_id", sa.String(36), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(8), nullable=False),
        _ts(),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("workspace_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("production_version", sa.Integer(), nullable=False),
        sa.Column("last_train_status", sa.String(32), nullable=False),
        _ts(),
    )
    op.create_index("ix_tasks_workspace_id", "tasks", ["workspace_id"])
    op.create_table(
        "labels",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("workspace_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("output_name", sa.String(255), nullable=False),
        sa.Column(
            "negative_for_task", sa.String(36), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=True
        ),
        _ts(),
    )
    op.create_index("ix_labels_workspace_id", "labels", ["workspace_id"])
    op.create_index("ix_labels_negative_for_task", "labels", ["negative_for_task"])
    op.create_table(
        "task_labels",
        sa.Column("task_id", sa.String(36), sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True),
        sa.Column(
            "label_id", sa.String(36), sa.ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True
        ),
        _ts(),
    )
    op.create_index("ix_task_labels_label_id", "task_labels", ["label_id"])
    op.create_table(
        "training_images",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("workspace_id", sa.String(36), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("blob_key", sa.String(255), nullable=False),
        sa.Column("thumb_key", sa.String(255), nullable=False),
        sa.Column("content_type", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("meta_data", sa.JSON(), nullable=False),
        sa.Column("test_image", sa.Boolean(), nullable=False),
        sa.Column("real", sa.Boolean(), nullable=False),
        sa.Column("verify_count", sa.Integer(), nullable=False),
        _ts(),
        sa.UniqueConstraint("workspace_id", "sha256", name="uq_training_images_workspace_sha256"),
    )
    op.create_index(
        "ix_training_images_workspace_created", "training_images", ["workspace_id", "created", "id"]
    )
    op.create_table(
        "image_labels",
        sa.Column(
            "image_id",
            sa.String(36),
            sa.ForeignKey("training_images.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "label_id", sa.String(36), sa.ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("value", sa.Float(), nullable=True),
        _ts(),
    )
    op.create_index("ix_image_labels_label_id", "image_labels", ["label_id"])
    op.create_table(
        "models",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("workspace_id", sa.String(36), nullable=False),
        sa.Column("task_id", sa.String(36), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("train_status", sa.String(32), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("bundle_uri", sa.String(1024), nullable=False),
        _ts(),
        sa.UniqueConstraint("task_id", "version", name="uq_models_task_version"),
    )
    op.create_index("ix_models_workspace_id", "models", ["workspace_id"])
    op.create_index("ix_models_task_id", "models", ["task_id"])


def downgrade() -> None:
    for table in ("models", "image_labels", "training_images", "task_labels", "labels", "tasks"):
        op.drop_table(table)
    op.drop_table("api_tokens")
    op.drop_table("instance_secrets")
    op.drop_table("users")
