"""The loop's tables: deployments (what serving runs, per role), their audit log, training runs;
and a `role` on every model version (policy or reward: swapped independently).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('deployment_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('version', sa.String(length=256), nullable=True),
    sa.Column('previous_version', sa.String(length=256), nullable=True),
    sa.Column('canary_percent', sa.Float(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deployment_events'))
    )
    with op.batch_alter_table('deployment_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deployment_events_role'), ['role'], unique=False)

    op.create_table('deployments',
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('serving_version', sa.String(length=256), nullable=False),
    sa.Column('canary_version', sa.String(length=256), nullable=True),
    sa.Column('canary_percent', sa.Float(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('role', name=op.f('pk_deployments'))
    )
    op.create_table('training_runs',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('stage', sa.String(length=32), nullable=True),
    sa.Column('plan', JSON_DOCUMENT, nullable=False),
    sa.Column('trigger', JSON_DOCUMENT, nullable=False),
    sa.Column('data_until', sa.DateTime(timezone=True), nullable=False),
    sa.Column('snapshots', JSON_DOCUMENT, nullable=False),
    sa.Column('base_policy_version', sa.String(length=256), nullable=True),
    sa.Column('base_reward_version', sa.String(length=256), nullable=True),
    sa.Column('policy_version', sa.String(length=256), nullable=True),
    sa.Column('reward_version', sa.String(length=256), nullable=True),
    sa.Column('report', JSON_DOCUMENT, nullable=False),
    sa.Column('metrics', JSON_DOCUMENT, nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('run_id', name=op.f('pk_training_runs'))
    )
    with op.batch_alter_table('training_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_runs_status'), ['status'], unique=False)

    # Existing versions get their role from their stage: reward models are the `rm` stage's.
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('role', sa.String(length=16), nullable=False, server_default='policy'))
        batch_op.create_index(batch_op.f('ix_model_versions_role'), ['role'], unique=False)
    op.execute("UPDATE model_versions SET role = 'reward' WHERE stage = 'rm'")
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.alter_column('role', server_default=None, existing_type=sa.String(length=16), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_versions_role'))
        batch_op.drop_column('role')

    with op.batch_alter_table('training_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_training_runs_status'))

    op.drop_table('training_runs')
    op.drop_table('deployments')
    with op.batch_alter_table('deployment_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployment_events_role'))

    op.drop_table('deployment_events')
