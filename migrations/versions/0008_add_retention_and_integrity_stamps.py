"""add what retention and the integrity check read (issue #13, items 2 and 3)

jobs.expires_at: when an ended job's files go (stamped by the retention sweep when it first
sees the job ended); jobs.verified_at: when its stored video's sha256 was last checked.
Indexes keep every sweep a bounded index range: (state, expires_at), (state, verified_at),
who borrowed a job's files through the result cache (jobs/segments.cached_from,
cache_entries.job_id), and old idempotency keys (created_at).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 06:40:00
"""

from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('expires_at', _TS, nullable=True))
        batch.add_column(sa.Column('verified_at', _TS, nullable=True))
        batch.create_index('ix_jobs_state_expires_at', ['state', 'expires_at'])
        batch.create_index('ix_jobs_state_verified_at', ['state', 'verified_at'])
        batch.create_index('ix_jobs_cached_from', ['cached_from'])
    with op.batch_alter_table('segments') as batch:
        batch.create_index('ix_segments_cached_from', ['cached_from'])
    with op.batch_alter_table('cache_entries') as batch:
        batch.create_index('ix_cache_entries_job_id', ['job_id'])
    with op.batch_alter_table('idempotency_keys') as batch:
        batch.create_index('ix_idempotency_keys_created_at', ['created_at'])


def downgrade() -> None:
    with op.batch_alter_table('idempotency_keys') as batch:
        batch.drop_index('ix_idempotency_keys_created_at')
    with op.batch_alter_table('cache_entries') as batch:
        batch.drop_index('ix_cache_entries_job_id')
    with op.batch_alter_table('segments') as batch:
        batch.drop_index('ix_segments_cached_from')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_cached_from')
        batch.drop_index('ix_jobs_state_verified_at')
        batch.drop_index('ix_jobs_state_expires_at')
        batch.drop_column('verified_at')
        batch.drop_column('expires_at')
