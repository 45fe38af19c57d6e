"""add api keys and idempotency keys

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 15:20:00
"""

from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=16), nullable=False),
        sa.Column('project', sa.String(length=64), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_api_keys_project', 'api_keys', ['project'])
    op.create_table(
        'idempotency_keys',
        sa.Column('project', sa.String(length=64), nullable=False),
        sa.Column('key', sa.String(length=128), nullable=False),
        sa.Column('body_sha256', sa.String(length=64), nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('project', 'key'),
    )


def downgrade() -> None:
    op.drop_table('idempotency_keys')
    op.drop_index('ix_api_keys_project', table_name='api_keys')
    op.drop_table('api_keys')
