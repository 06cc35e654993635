"""What each task's InferenceService serves (cluster mode), and the optional canary split.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("canary_percent", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("served_spec", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("serving_error", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("serving_error")
        batch.drop_column("served_spec")
        batch.drop_column("canary_percent")
