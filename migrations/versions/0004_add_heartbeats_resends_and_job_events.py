"""add segment heartbeats, job resends and the job event log

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 17:30:00
"""

from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('segments') as batch:
        batch.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('resends', sa.Integer(), nullable=False, server_default='0'))
    op.create_table(
        'job_events',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('segment_index', sa.Integer(), nullable=True),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('worker', sa.String(length=128), nullable=True),
        sa.Column('message', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_job_events_job_id', 'job_events', ['job_id'])


def downgrade() -> None:
    op.drop_index('ix_job_events_job_id', table_name='job_events')
    op.drop_table('job_events')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('resends')
    with op.batch_alter_table('segments') as batch:
        batch.drop_column('heartbeat_at')
