"""jobs.tier and the indexes admission and the reconciler read (issue #14, item 5)

Admission runs per tier over a bounded look-ahead: the top waiting jobs of one tier by
priority (100 first), oldest first, read from a partial index over the jobs not yet sent
(dispatched_at null, not held), never the whole queue. The tier was only inside the JSON
``route``; it gets its own column (backfilled from route.tier) so it can be indexed and
grouped. Jobs in flight (sent, not ended: on the GPUs or stitching, a few hundred at most)
have a partial index of their own, which admission's holdings and the reconciler read; the
reconciler asks which of them have a fresh heartbeat through a partial index over running
segments.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 07:15:00
"""

from alembic import op
import sqlalchemy as sa

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

NOT_SENT = "dispatched_at IS NULL AND NOT held"
IN_FLIGHT = "dispatched_at IS NOT NULL AND state IN ('queued', 'running', 'stitching')"
BEATING = "state = 'running'"


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('tier', sa.String(32), nullable=False, server_default=''))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("UPDATE jobs SET tier = COALESCE(route->>'tier', '')")
    else:
        op.execute("UPDATE jobs SET tier = COALESCE(json_extract(route, '$.tier'), '')")
    with op.batch_alter_table('jobs') as batch:
        batch.create_index('ix_jobs_in_flight', ['state', 'dispatched_at'],
                           postgresql_where=sa.text(IN_FLIGHT), sqlite_where=sa.text(IN_FLIGHT))
        batch.create_index('ix_jobs_admission_order',
                           ['tier', 'state', sa.text('priority DESC'), 'created_at', 'id'],
                           postgresql_where=sa.text(NOT_SENT), sqlite_where=sa.text(NOT_SENT))
    with op.batch_alter_table('segments') as batch:
        batch.create_index('ix_segments_beating', ['heartbeat_at'],
                           postgresql_where=sa.text(BEATING), sqlite_where=sa.text(BEATING))


def downgrade() -> None:
    with op.batch_alter_table('segments') as batch:
        batch.drop_index('ix_segments_beating')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_admission_order')
        batch.drop_index('ix_jobs_in_flight')
        batch.drop_column('tier')
