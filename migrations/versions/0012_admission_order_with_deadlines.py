"""Admission order with deadlines: the look-ahead index, earliest deadline first (issue #15)

Admission reads a tier's waiting jobs in scheduler.deadlines.admission_key order: priority
band first (priority / 10, integer division, 100 first), within a band the earliest deadline
first with jobs without one after, then priority, age and id. The index of migration 0010
(priority, created_at, id) can no longer give that order, so it is replaced, not kept beside
the new one: the look-ahead is its only reader, and every job insert and dispatch would
otherwise update two indexes. Written with expressions both PostgreSQL and SQLite index
(SQLite has no NULLS LAST in an index, so "deadline IS NULL" is a key of its own).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 11:00:00
"""

from alembic import op
import sqlalchemy as sa

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

NOT_SENT = "dispatched_at IS NULL AND NOT held"
EDF_ORDER = ['tier', 'state', sa.text('(-(priority / 10))'), sa.text('(deadline_at IS NULL)'),
             'deadline_at', sa.text('priority DESC'), 'created_at', 'id']


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_admission_order')
        batch.create_index('ix_jobs_admission_edf', EDF_ORDER,
                           postgresql_where=sa.text(NOT_SENT), sqlite_where=sa.text(NOT_SENT))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_admission_edf')
        batch.create_index('ix_jobs_admission_order',
                           ['tier', 'state', sa.text('priority DESC'), 'created_at', 'id'],
                           postgresql_where=sa.text(NOT_SENT), sqlite_where=sa.text(NOT_SENT))
