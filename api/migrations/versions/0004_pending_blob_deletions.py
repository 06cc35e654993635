"""Deleted images' blobs are collected later, once nothing needs them (api/blob_gc.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pending_blob_deletions",
        sa.Column("workspace_id", sa.String(36), primary_key=True),
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("requested", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_pending_blob_deletions_requested", "pending_blob_deletions", ["requested"])


def downgrade() -> None:
    op.drop_index("ix_pending_blob_deletions_requested", table_name="pending_blob_deletions")
    op.drop_table("pending_blob_deletions")
