"""Alembic environment: run programmatically by `feedback.store.database.migrate` with the store's
engine in `config.attributes["engine"]` (no alembic.ini, no URL in a file)."""
from alembic import context

from feedback.store.tables import StoreModel

config = context.config
engine = config.attributes["engine"]

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=StoreModel.metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
