"""Initial schema: completions, feedback (ratings, comparisons, rankings + entries, demonstrations),
dead letters, dataset snapshots and the model registry.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Migrations are frozen copies of the schema at their revision: they use plain SQLAlchemy types, never
the models in tables.py (which keep changing). The next revision: `down_revision = "0001"`, made with
alembic's autogenerate against a database at 0001 (see "Schema changes" in docs/datasets.md).
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

# JSONB on Postgres, JSON (text) on SQLite: the same as feedback.store.types.JSONDocument.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('completions',
    sa.Column('completion_id', sa.String(length=128), nullable=False),
    sa.Column('event_id', sa.String(length=128), nullable=False),
    sa.Column('schema_version', sa.Integer(), nullable=False),
    sa.Column('tenant', sa.String(), nullable=False),
    sa.Column('user_id', sa.String(), nullable=False),
    sa.Column('prompt_text', sa.Text(), nullable=True),
    sa.Column('prompt_chat', JSON_DOCUMENT, nullable=True),
    sa.Column('prompt_key', sa.String(length=64), nullable=False),
    sa.Column('response', sa.Text(), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('model_version', sa.String(length=256), nullable=False),
    sa.Column('parameters', JSON_DOCUMENT, nullable=False),
    sa.Column('finish_reason', sa.String(length=32), nullable=True),
    sa.Column('comparison_id', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('completion_id', name=op.f('pk_completions')),
    sa.UniqueConstraint('event_id', name=op.f('uq_completions_event_id'))
    )
    op.create_index(op.f('ix_completions_comparison_id'), 'completions', ['comparison_id'], unique=False)
    op.create_index(op.f('ix_completions_model_version'), 'completions', ['model_version'], unique=False)
    op.create_index(op.f('ix_completions_prompt_key'), 'completions', ['prompt_key'], unique=False)

    op.create_table('dataset_snapshots',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('counts', JSON_DOCUMENT, nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('heldout_fraction', sa.Float(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dataset_snapshots'))
    )
    op.create_index(op.f('ix_dataset_snapshots_content_hash'), 'dataset_snapshots', ['content_hash'], unique=False)
    op.create_index(op.f('ix_dataset_snapshots_kind'), 'dataset_snapshots', ['kind'], unique=False)

    op.create_table('dead_letters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('topic', sa.String(length=256), nullable=True),
    sa.Column('partition', sa.Integer(), nullable=True),
    sa.Column('offset', sa.BigInteger(), nullable=True),
    sa.Column('key', sa.LargeBinary(), nullable=True),
    sa.Column('raw', sa.LargeBinary(), nullable=False),
    sa.Column('event_id', sa.String(length=128), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dead_letters'))
    )
    op.create_index(op.f('ix_dead_letters_event_id'), 'dead_letters', ['event_id'], unique=False)
    op.create_index(op.f('uq_dead_letters_position'), 'dead_letters', ['topic', 'partition', 'offset'], unique=True)

    op.create_table('model_versions',
    sa.Column('version', sa.String(length=256), nullable=False),
    sa.Column('parent_version', sa.String(length=256), nullable=True),
    sa.Column('stage', sa.String(length=32), nullable=False),
    sa.Column('checkpoint_path', sa.Text(), nullable=False),
    sa.Column('checksums', JSON_DOCUMENT, nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('metrics', JSON_DOCUMENT, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('candidate', 'canary', 'serving', 'rejected', 'retired')", name=op.f('ck_model_versions_status')),
    sa.PrimaryKeyConstraint('version', name=op.f('pk_model_versions'))
    )
    op.create_index(op.f('ix_model_versions_status'), 'model_versions', ['status'], unique=False)

    op.create_table('rankings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('event_id', sa.String(length=128), nullable=False),
    sa.Column('prompt_key', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('tenant', sa.String(), nullable=False),
    sa.Column('user_id', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rankings')),
    sa.UniqueConstraint('event_id', name=op.f('uq_rankings_event_id'))
    )
    op.create_index(op.f('ix_rankings_prompt_key'), 'rankings', ['prompt_key'], unique=False)

    op.create_table('comparisons',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('event_id', sa.String(length=128), nullable=False),
    sa.Column('comparison_id', sa.String(length=128), nullable=True),
    sa.Column('completion_a', sa.String(length=128), nullable=False),
    sa.Column('completion_b', sa.String(length=128), nullable=False),
    sa.Column('winner', sa.String(length=16), nullable=False),
    sa.Column('prompt_key', sa.String(length=64), nullable=False),
    sa.Column('tenant', sa.String(), nullable=False),
    sa.Column('user_id', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("winner IN ('a', 'b', 'tie', 'both_bad')", name=op.f('ck_comparisons_winner')),
    sa.ForeignKeyConstraint(['completion_a'], ['completions.completion_id'], name=op.f('fk_comparisons_completion_a_completions')),
    sa.ForeignKeyConstraint(['completion_b'], ['completions.completion_id'], name=op.f('fk_comparisons_completion_b_completions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_comparisons')),
    sa.UniqueConstraint('event_id', name=op.f('uq_comparisons_event_id'))
    )
    op.create_index(op.f('ix_comparisons_comparison_id'), 'comparisons', ['comparison_id'], unique=False)
    op.create_index(op.f('ix_comparisons_completion_a'), 'comparisons', ['completion_a'], unique=False)
    op.create_index(op.f('ix_comparisons_completion_b'), 'comparisons', ['completion_b'], unique=False)
    op.create_index(op.f('ix_comparisons_prompt_key'), 'comparisons', ['prompt_key'], unique=False)

    op.create_table('demonstrations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('event_id', sa.String(length=128), nullable=False),
    sa.Column('completion_id', sa.String(length=128), nullable=True),
    sa.Column('prompt_text', sa.Text(), nullable=True),
    sa.Column('prompt_chat', JSON_DOCUMENT, nullable=True),
    sa.Column('prompt_key', sa.String(length=64), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('tenant', sa.String(), nullable=False),
    sa.Column('user_id', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['completion_id'], ['completions.completion_id'], name=op.f('fk_demonstrations_completion_id_completions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_demonstrations')),
    sa.UniqueConstraint('event_id', name=op.f('uq_demonstrations_event_id'))
    )
    op.create_index(op.f('ix_demonstrations_completion_id'), 'demonstrations', ['completion_id'], unique=False)
    op.create_index(op.f('ix_demonstrations_prompt_key'), 'demonstrations', ['prompt_key'], unique=False)

    op.create_table('ranking_entries',
    sa.Column('ranking_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('completion_id', sa.String(length=128), nullable=False),
    sa.ForeignKeyConstraint(['completion_id'], ['completions.completion_id'], name=op.f('fk_ranking_entries_completion_id_completions')),
    sa.ForeignKeyConstraint(['ranking_id'], ['rankings.id'], name=op.f('fk_ranking_entries_ranking_id_rankings')),
    sa.PrimaryKeyConstraint('ranking_id', 'position', name=op.f('pk_ranking_entries'))
    )
    op.create_index(op.f('ix_ranking_entries_completion_id'), 'ranking_entries', ['completion_id'], unique=False)

    op.create_table('ratings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('event_id', sa.String(length=128), nullable=False),
    sa.Column('completion_id', sa.String(length=128), nullable=False),
    sa.Column('score', sa.Integer(), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('tenant', sa.String(), nullable=False),
    sa.Column('user_id', sa.String(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ingested_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('score IN (-1, 1)', name=op.f('ck_ratings_score')),
    sa.ForeignKeyConstraint(['completion_id'], ['completions.completion_id'], name=op.f('fk_ratings_completion_id_completions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ratings')),
    sa.UniqueConstraint('event_id', name=op.f('uq_ratings_event_id'))
    )
    op.create_index(op.f('ix_ratings_completion_id'), 'ratings', ['completion_id'], unique=False)



def downgrade() -> None:
    op.drop_index(op.f('ix_ratings_completion_id'), table_name='ratings')

    op.drop_table('ratings')
    op.drop_index(op.f('ix_ranking_entries_completion_id'), table_name='ranking_entries')

    op.drop_table('ranking_entries')
    op.drop_index(op.f('ix_demonstrations_prompt_key'), table_name='demonstrations')
    op.drop_index(op.f('ix_demonstrations_completion_id'), table_name='demonstrations')

    op.drop_table('demonstrations')
    op.drop_index(op.f('ix_comparisons_prompt_key'), table_name='comparisons')
    op.drop_index(op.f('ix_comparisons_completion_b'), table_name='comparisons')
    op.drop_index(op.f('ix_comparisons_completion_a'), table_name='comparisons')
    op.drop_index(op.f('ix_comparisons_comparison_id'), table_name='comparisons')

    op.drop_table('comparisons')
    op.drop_index(op.f('ix_rankings_prompt_key'), table_name='rankings')

    op.drop_table('rankings')
    op.drop_index(op.f('ix_model_versions_status'), table_name='model_versions')

    op.drop_table('model_versions')
    op.drop_index(op.f('uq_dead_letters_position'), table_name='dead_letters')
    op.drop_index(op.f('ix_dead_letters_event_id'), table_name='dead_letters')

    op.drop_table('dead_letters')
    op.drop_index(op.f('ix_dataset_snapshots_kind'), table_name='dataset_snapshots')
    op.drop_index(op.f('ix_dataset_snapshots_content_hash'), table_name='dataset_snapshots')

    op.drop_table('dataset_snapshots')
    op.drop_index(op.f('ix_completions_prompt_key'), table_name='completions')
    op.drop_index(op.f('ix_completions_model_version'), table_name='completions')
    op.drop_index(op.f('ix_completions_comparison_id'), table_name='completions')

    op.drop_table('completions')
