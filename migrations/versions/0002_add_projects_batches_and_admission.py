"""add projects, tracks, batches, the rules hash and admission to jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 14:45:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'batches',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('project', sa.String(length=64), nullable=False),
        sa.Column('window', sa.String(length=32), nullable=True),
        sa.Column('timezone', sa.String(length=64), nullable=False),
        sa.Column('on_window_close', sa.String(length=16), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('report_keys', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_batches_project', 'batches', ['project'])
    op.create_index('ix_batches_state', 'batches', ['state'])
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('project', sa.String(length=64), nullable=False,
                                   server_default='default'))
        batch.add_column(sa.Column('track', sa.String(length=16), nullable=False,
                                   server_default='draft'))
        batch.add_column(sa.Column('batch_id', sa.String(length=32), nullable=True))
        batch.add_column(sa.Column('rules_sha256', sa.String(length=64), nullable=False,
                                   server_default=''))
        batch.add_column(sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))
        batch.create_index('ix_jobs_project', ['project'])
        batch.create_index('ix_jobs_batch_id', ['batch_id'])
        batch.create_index('ix_jobs_dispatched_at', ['dispatched_at'])
        batch.create_foreign_key('fk_jobs_batch_id_batches', 'batches', ['batch_id'], ['id'],
                                 ondelete='SET NULL')
    # Jobs from before admission existed were sent to Celery when they were created.
    op.execute("UPDATE jobs SET dispatched_at = created_at WHERE dispatched_at IS NULL")


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_constraint('fk_jobs_batch_id_batches', type_='foreignkey')
        batch.drop_index('ix_jobs_dispatched_at')
        batch.drop_index('ix_jobs_batch_id')
        batch.drop_index('ix_jobs_project')
        for column in ('dispatched_at', 'rules_sha256', 'batch_id', 'track', 'project'):
            batch.drop_column(column)
    op.drop_index('ix_batches_state', table_name='batches')
    op.drop_index('ix_batches_project', table_name='batches')
    op.drop_table('batches')
