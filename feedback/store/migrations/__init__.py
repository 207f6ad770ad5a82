"""Alembic migrations of the feedback store (run by feedback.store.database.migrate)."""
