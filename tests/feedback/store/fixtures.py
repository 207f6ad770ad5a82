"""Store fixtures for both databases: `store` runs each test on SQLite and on Postgres.

Postgres: a fresh database `feedloop_test_<random>` per test session, dropped at the end; tables are
emptied between tests. Unreachable Postgres skips those tests on a laptop and FAILS them in CI
(CI=true): CI must never pass without having run them.
"""
from __future__ import annotations

import os
import uuid

import psycopg
import pytest
from sqlalchemy import text

from feedback.store import FeedbackStore
from feedback.store.tables import StoreModel

POSTGRES = os.environ.get("FEEDLOOP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASES = ["sqlite", "postgres"]


def _admin_connection() -> psycopg.Connection:
    try:
        return psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        message = f"Postgres unreachable at {POSTGRES}: {error}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def _database_url(name: str) -> str:
    return POSTGRES.rsplit("/", 1)[0] + "/" + name


def create_postgres_database() -> str:
    name = f"feedloop_test_{uuid.uuid4().hex[:12]}"
    with _admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_postgres_database(name: str) -> None:
    with _admin_connection() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_store_url():
    """A migrated database for the whole session."""
    name = create_postgres_database()
    url = _database_url(name)
    store = FeedbackStore(url)
    store.migrate()
    store.close()
    yield url
    drop_postgres_database(name)


@pytest.fixture(params=DATABASES)
def empty_database_url(request, tmp_path):
    """A database that has never been migrated (one per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    name = create_postgres_database()
    yield _database_url(name)
    drop_postgres_database(name)


def empty_tables(store: FeedbackStore) -> None:
    names = ", ".join(StoreModel.metadata.tables)
    with store.engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=DATABASES)
def store(request, tmp_path):
    if request.param == "sqlite":
        store = FeedbackStore(f"sqlite:///{tmp_path / 'feedloop.db'}")
        store.migrate()
    else:
        store = FeedbackStore(request.getfixturevalue("postgres_store_url"))
        empty_tables(store)
    yield store
    store.close()
