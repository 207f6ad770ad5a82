"""The schema comes from alembic migrations, on both databases, and matches the models."""
from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from feedback.store import FeedbackStore
from feedback.store.database import MIGRATIONS, downgrade, head_revision, migrate, normalise_url
from feedback.store.tables import StoreModel

REVISIONS = [(r.revision, r.down_revision) for r in ScriptDirectory(str(MIGRATIONS)).walk_revisions()]


@pytest.fixture
def empty_store(empty_database_url):
    store = FeedbackStore(empty_database_url)
    yield store
    store.close()


def test_migrate_from_an_empty_database_to_head_records_the_schema_version(empty_store):
    assert empty_store.schema_revision() is None
    empty_store.migrate()
    assert empty_store.schema_revision() == head_revision() == "0004"
    assert set(inspect(empty_store.engine).get_table_names()) == set(StoreModel.metadata.tables) | {"alembic_version"}
    empty_store.migrate()  # at head already: nothing to do, nothing lost
    assert empty_store.schema_revision() == head_revision()


@pytest.mark.parametrize("revision, previous", REVISIONS, ids=[r for r, _ in REVISIONS])
def test_each_revision_upgrades_from_the_previous_one_and_back(empty_store, revision, previous):
    migrate(empty_store.engine, previous or "base")
    migrate(empty_store.engine, revision)
    assert empty_store.schema_revision() == revision
    downgrade(empty_store.engine, previous or "base")
    assert empty_store.schema_revision() == previous
    empty_store.migrate()
    assert empty_store.schema_revision() == head_revision()


def test_migrated_schema_is_exactly_the_models(empty_store):
    """A model changed without a migration (or the reverse) fails here: autogenerate finds no diff."""
    empty_store.migrate()
    with empty_store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, StoreModel.metadata) == []


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'sub' / 'dir' / 'feedloop.db'}")  # parent created
    with store.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    store.close()


def test_postgres_urls_use_psycopg_3():
    assert normalise_url("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    assert normalise_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ValueError, match="unsupported database URL"):
        FeedbackStore("mysql://h/db")
