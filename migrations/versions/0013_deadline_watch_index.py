"""The deadline watch's index: live jobs with a deadline not yet missed (issue #15)

farm.jobs.deadline_watch reads, every beat tick, the jobs with a deadline still to meet
(deadline_at set, deadline_missed_at NULL, state queued, waiting, running or stitching):
a partial index on deadline_at over those rows only, so the tick never reads the finished
history (100,000 jobs a day).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 12:00:00
"""

from alembic import op
import sqlalchemy as sa

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

DEADLINE_LIVE = ("deadline_at IS NOT NULL AND deadline_missed_at IS NULL AND state IN "
                 "('queued', 'waiting', 'running', 'stitching')")


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.create_index('ix_jobs_deadline_live', ['deadline_at'],
                           postgresql_where=sa.text(DEADLINE_LIVE),
                           sqlite_where=sa.text(DEADLINE_LIVE))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_deadline_live')
