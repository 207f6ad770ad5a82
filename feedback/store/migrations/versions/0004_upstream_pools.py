"""Upstream pools in the store: blue/green pools registered at run time, followed by every gateway.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""
from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('upstream_pools',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('url', sa.String(length=512), nullable=False),
    sa.Column('discovery', sa.String(length=8), nullable=True),
    sa.Column('model_version', sa.String(length=256), nullable=True),
    sa.Column('model', sa.String(length=256), nullable=True),
    sa.Column('api_key_env', sa.String(length=128), nullable=True),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_upstream_pools'))
    )
    with op.batch_alter_table('upstream_pools', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_upstream_pools_role'), ['role'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('upstream_pools', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_upstream_pools_role'))
    op.drop_table('upstream_pools')
