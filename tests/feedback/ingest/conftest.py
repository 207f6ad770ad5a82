from tests.feedback.store.fixtures import empty_database_url, postgres_store_url, store  # noqa: F401
