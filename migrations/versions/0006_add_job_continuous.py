"""add jobs.continuous: a long video's segments continue each other (issue #11, item 7)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 19:10:00
"""

from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Jobs already in the table were rendered as independent clips: they keep that.
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('continuous', sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('continuous')
