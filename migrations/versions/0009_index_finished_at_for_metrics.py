"""index what the metrics collector reads newly finished work by (issue #13, item 7)

The collector (farm/api/metrics.py) observes the jobs finished, and the webhook deliveries
delivered, since its last scrape: a bounded index range on jobs.finished_at and
webhook_deliveries.delivered_at, never a scan of the tables.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 06:45:00
"""

from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.create_index('ix_jobs_finished_at', ['finished_at'])
    with op.batch_alter_table('webhook_deliveries') as batch:
        batch.create_index('ix_webhook_deliveries_delivered_at', ['delivered_at'])


def downgrade() -> None:
    with op.batch_alter_table('webhook_deliveries') as batch:
        batch.drop_index('ix_webhook_deliveries_delivered_at')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_finished_at')
