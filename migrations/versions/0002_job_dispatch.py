"""Job dispatch bookkeeping: the outbox columns, retry backoff and worker-loss history.

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("available_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("next_dispatch_at", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("dispatch_count", sa.Integer(), server_default="0",
                                      nullable=False))
        batch_op.add_column(sa.Column("lost_count", sa.Integer(), server_default="0",
                                      nullable=False))
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("last_worker", sa.String(length=255), nullable=True))
        batch_op.create_index("ix_jobs_state_next_dispatch", ["state", "next_dispatch_at"],
                              unique=False)
    # Jobs queued before this version were sent by the API itself; send them again (a duplicate
    # delivery is harmless: the lease decides who runs).
    op.execute(sa.text("UPDATE jobs SET next_dispatch_at = created_at WHERE state = 'queued'"))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_state_next_dispatch")
        batch_op.drop_column("last_worker")
        batch_op.drop_column("last_error")
        batch_op.drop_column("lost_count")
        batch_op.drop_column("dispatch_count")
        batch_op.drop_column("dispatched_at")
        batch_op.drop_column("next_dispatch_at")
        batch_op.drop_column("available_at")
