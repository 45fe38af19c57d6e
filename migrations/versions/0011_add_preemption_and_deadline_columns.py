"""Preemption state on segments and deadlines on jobs (issue #15)

A running segment can be asked to yield its group at its next denoising step
(``preempt_requested_at``); when it does, its denoising state is saved to storage and the
segment goes back to pending with ``resume_key`` / ``resume_sha256`` / ``resume_step``
naming that state, and ``preemptions`` counts how often it yielded. A job may carry a
deadline (``deadline_at``), a ``deadline_risk`` flag the farm's estimate sets, and
``deadline_missed_at``, the time it was first seen missed (its webhook goes once). A
segment rendered in a batch with like segments of other jobs names that batched render
(``render_batch``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 10:55:00
"""

from alembic import op
import sqlalchemy as sa

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('deadline_risk', sa.Boolean(), nullable=False,
                                   server_default=sa.text('false')))
        batch.add_column(sa.Column('deadline_missed_at', sa.DateTime(timezone=True),
                                   nullable=True))
    with op.batch_alter_table('segments') as batch:
        batch.add_column(sa.Column('preempt_requested_at', sa.DateTime(timezone=True),
                                   nullable=True))
        batch.add_column(sa.Column('preemptions', sa.Integer(), nullable=False,
                                   server_default=sa.text('0')))
        batch.add_column(sa.Column('resume_key', sa.String(512), nullable=True))
        batch.add_column(sa.Column('resume_sha256', sa.String(64), nullable=True))
        batch.add_column(sa.Column('resume_step', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('render_batch', sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('segments') as batch:
        for name in ('render_batch', 'resume_step', 'resume_sha256', 'resume_key', 'preemptions',
                     'preempt_requested_at'):
            batch.drop_column(name)
    with op.batch_alter_table('jobs') as batch:
        for name in ('deadline_missed_at', 'deadline_risk', 'deadline_at'):
            batch.drop_column(name)
