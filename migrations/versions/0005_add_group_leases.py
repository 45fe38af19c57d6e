"""add group leases: one driver per actor group of a pool

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 19:00:00
"""

from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'group_leases',
        sa.Column('pool', sa.String(length=200), nullable=False),
        sa.Column('replica', sa.Integer(), nullable=False),
        sa.Column('holder', sa.String(length=64), nullable=True),
        sa.Column('job_id', sa.String(length=32), nullable=True),
        sa.Column('segment_index', sa.Integer(), nullable=True),
        sa.Column('leased_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('pool', 'replica'),
    )
    op.create_index(op.f('ix_group_leases_job_id'), 'group_leases', ['job_id'])


def downgrade() -> None:
    op.drop_index(op.f('ix_group_leases_job_id'), table_name='group_leases')
    op.drop_table('group_leases')
