"""add the result cache, job controls, webhooks, retention and stage times (issue #13)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 06:20:00
"""

from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('cache_key', sa.String(64), nullable=True))
        batch.add_column(sa.Column('cached_from', sa.String(32), nullable=True))
        batch.add_column(sa.Column('held', sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column('timeout_s', sa.Float(), nullable=True))
        batch.add_column(sa.Column('queue_ttl_s', sa.Float(), nullable=True))
        batch.add_column(sa.Column('retain_days', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('webhook', sa.String(2048), nullable=True))
        batch.add_column(sa.Column('webhook_events', sa.JSON(), nullable=False,
                                   server_default='[]'))
        batch.add_column(sa.Column('stage_times', sa.JSON(), nullable=False,
                                   server_default='{}'))
        batch.add_column(sa.Column('peak_memory_bytes', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('deleted_at', _TS, nullable=True))
        batch.create_index('ix_jobs_cache_key', ['cache_key'])
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('webhook', sa.String(2048), nullable=True))
        batch.add_column(sa.Column('webhook_events', sa.JSON(), nullable=False,
                                   server_default='[]'))
    with op.batch_alter_table('segments') as batch:
        batch.add_column(sa.Column('cache_key', sa.String(64), nullable=True))
        batch.add_column(sa.Column('cached_from', sa.String(32), nullable=True))
        batch.create_index('ix_segments_cache_key', ['cache_key'])
    op.create_table(
        'cache_entries',
        sa.Column('key', sa.String(64), primary_key=True),
        sa.Column('kind', sa.String(16), nullable=False),
        sa.Column('project', sa.String(64), nullable=False, index=True),
        sa.Column('job_id', sa.String(32), nullable=False),
        sa.Column('segment_index', sa.Integer(), nullable=True),
        sa.Column('keys', sa.JSON(), nullable=False),
        sa.Column('seam_key', sa.String(512), nullable=True),
        sa.Column('sha256', sa.String(64), nullable=True),
        sa.Column('bytes', sa.BigInteger(), nullable=False),
        sa.Column('hits', sa.Integer(), nullable=False),
        sa.Column('created_at', _TS, nullable=False),
        sa.Column('last_hit_at', _TS, nullable=False, index=True),
    )
    op.create_table(
        'project_secrets',
        sa.Column('project', sa.String(64), primary_key=True),
        sa.Column('webhook_secret', sa.String(128), nullable=False),
        sa.Column('created_at', _TS, nullable=False),
    )
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('project', sa.String(64), nullable=False),
        sa.Column('job_id', sa.String(32), nullable=True, index=True),
        sa.Column('batch_id', sa.String(32), nullable=True),
        sa.Column('event', sa.String(32), nullable=False),
        sa.Column('url', sa.String(2048), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', _TS, nullable=True, index=True),
        sa.Column('delivered_at', _TS, nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', _TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table('webhook_deliveries')
    op.drop_table('project_secrets')
    op.drop_table('cache_entries')
    with op.batch_alter_table('segments') as batch:
        batch.drop_index('ix_segments_cache_key')
        batch.drop_column('cached_from')
        batch.drop_column('cache_key')
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('webhook_events')
        batch.drop_column('webhook')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_cache_key')
        for column in ('deleted_at', 'peak_memory_bytes', 'stage_times', 'webhook_events',
                       'webhook', 'retain_days', 'queue_ttl_s', 'timeout_s', 'held',
                       'cached_from', 'cache_key'):
            batch.drop_column(column)
