"""The feedback store: served completions, feedback of every kind, dead letters, dataset snapshots
and the model registry, in SQLite (default) or Postgres, chosen by URL.

    store = FeedbackStore("sqlite:///data/feedloop.db")   # or "postgresql://user@host/db"
    store.migrate()                                       # alembic upgrade to head
    result = store.write_events([completion_served, feedback_event, ...])

Tables and formats: docs/datasets.md.
"""
from feedback.store.store import DeadLetterRecord, FeedbackStore, VersionConflict, WriteResult
from feedback.store.validation import Rejected

__all__ = ["FeedbackStore", "WriteResult", "DeadLetterRecord", "VersionConflict", "Rejected"]
