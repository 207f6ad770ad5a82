"""FeedbackStore: the one way into the feedback database (sync; the ingestor calls it from a thread)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from feedback.store import database
from feedback.store.tables import (MODEL_ROLES, MODEL_STATUSES, Comparison, Completion, DatasetSnapshot, DeadLetter, Demonstration,
                                   ModelVersion, Ranking, RankingEntry, Rating, StoreModel)
from feedback.store.types import utcnow
from feedback.store.validation import Event, KnownCompletion, Rejected, plan_batch, referenced_completion_ids

# Bind parameters per IN (...) lookup: far below SQLite's 32766 and Postgres's 65535.
LOOKUP_CHUNK = 5000


@dataclass
class WriteResult:
    inserted: int  # events stored by this call
    duplicates: int  # events whose event_id was stored before (or earlier in the same batch)
    rejected: list[Rejected] = field(default_factory=list)  # (event, reason): for the dead-letter topic


@dataclass(frozen=True)
class DeadLetterRecord:
    """An event that could not be stored, where it was on the bus, and why."""

    raw: bytes
    reason: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    key: bytes | None = None
    event_id: str | None = None


class VersionConflict(Exception):
    """A model version registered again with other files: checkpoints are immutable."""


def _table(model: type[StoreModel]) -> Table:
    return model.__table__  # type: ignore[attr-defined]


class FeedbackStore:
    def __init__(self, url: str):
        self.url = url
        self.engine = database.create_store_engine(url)
        dialect = self.engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {dialect}")
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert

    def close(self) -> None:
        self.engine.dispose()

    # -- schema -------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Upgrade the schema to the newest revision (no-op when it is there already)."""
        database.migrate(self.engine)

    def schema_revision(self) -> str | None:
        return database.current_revision(self.engine)

    # -- events -------------------------------------------------------------------------------

    def write_events(self, events: list[Event]) -> WriteResult:
        """Store a batch in ONE transaction, idempotently on event_id.

        Invalid events come back in `rejected` (the valid ones are stored); a database error
        raises and leaves nothing of the batch behind, so the caller retries the whole batch.
        """
        received_at = utcnow()
        with self.engine.begin() as connection:
            stored = self._known_completions(connection, referenced_completion_ids(events))
            plan = plan_batch(events, stored, received_at)
            inserted = self._insert_ignoring_duplicates(connection, Completion, plan.completions)
            inserted += self._insert_ignoring_duplicates(connection, Rating, plan.ratings)
            inserted += self._insert_ignoring_duplicates(connection, Comparison, plan.comparisons)
            inserted += self._insert_rankings(connection, plan.rankings)
            inserted += self._insert_ignoring_duplicates(connection, Demonstration, plan.demonstrations)
        return WriteResult(inserted=inserted, duplicates=plan.valid - inserted + plan.repeated,
                           rejected=plan.rejected)

    def _known_completions(self, connection, ids: set[str]) -> dict[str, KnownCompletion]:
        table = _table(Completion)
        known = {}
        for chunk in _chunks(sorted(ids), LOOKUP_CHUNK):
            rows = connection.execute(select(table.c.completion_id, table.c.prompt_key, table.c.event_id)
                                      .where(table.c.completion_id.in_(chunk)))
            known.update({r.completion_id: KnownCompletion(r.prompt_key, r.event_id) for r in rows})
        return known

    def _insert_ignoring_duplicates(self, connection, model, rows: list[dict], key: str = "event_id") -> int:
        """INSERT … ON CONFLICT DO NOTHING: a row whose event_id is stored already is skipped, not an
        error (the same SQL on SQLite and Postgres). Returns how many rows were new."""
        return len(self._insert_returning(connection, model, rows, key))

    def _insert_returning(self, connection, model, rows: list[dict], *columns: str) -> list:
        if not rows:
            return []
        table = _table(model)
        statement = self._insert(table).on_conflict_do_nothing().returning(*(table.c[c] for c in columns))
        return connection.execute(statement, rows).all()

    def _insert_rankings(self, connection, rankings: list[tuple[dict, list[str]]]) -> int:
        new = self._insert_returning(connection, Ranking, [row for row, _ in rankings], "id", "event_id")
        ranking_ids = {r.event_id: r.id for r in new}
        entries = [{"ranking_id": ranking_ids[row["event_id"]], "position": position, "completion_id": completion_id}
                   for row, ids in rankings if row["event_id"] in ranking_ids
                   for position, completion_id in enumerate(ids)]
        if entries:
            connection.execute(_table(RankingEntry).insert(), entries)
        return len(new)

    def write_dead_letters(self, letters: Iterable[DeadLetterRecord]) -> int:
        """Keep events that cannot be stored; one row per bus position, so a redelivered bad event
        is kept once. Returns how many rows were new."""
        rows = [{**letter.__dict__, "created_at": utcnow()} for letter in letters]
        with self.engine.begin() as connection:
            return len(self._insert_returning(connection, DeadLetter, rows, "id"))

    def write_dead_letter(self, raw: bytes, reason: str, *, topic: str | None = None, partition: int | None = None,
                          offset: int | None = None, key: bytes | None = None, event_id: str | None = None) -> int:
        return self.write_dead_letters([DeadLetterRecord(raw=raw, reason=reason, topic=topic, partition=partition,
                                                         offset=offset, key=key, event_id=event_id)])

    # -- reads --------------------------------------------------------------------------------

    def completion_exists(self, completion_ids: Iterable[str]) -> set[str]:
        """The ids among `completion_ids` that are stored."""
        with self.engine.connect() as connection:
            return set(self._known_completions(connection, set(completion_ids)))

    def completion_prompt_keys(self, completion_ids: Iterable[str]) -> dict[str, str]:
        """completion_id → prompt_key for the ids that are stored (one query per LOOKUP_CHUNK ids): the
        gateway's fallback when a completion is not in its memory."""
        with self.engine.connect() as connection:
            known = self._known_completions(connection, set(completion_ids))
        return {cid: k.prompt_key for cid, k in known.items()}

    def get_completion(self, completion_id: str) -> Completion | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(Completion, completion_id)

    def counts(self) -> dict[str, int]:
        """Rows per table (tests, benchmarks, `feedloop data` summaries)."""
        with self.engine.connect() as connection:
            return {name: connection.execute(select(func.count()).select_from(table)).scalar_one()
                    for name, table in StoreModel.metadata.tables.items()}

    def dead_letters(self) -> list[DeadLetter]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.execute(select(DeadLetter).order_by(DeadLetter.id)).scalars())

    # -- model registry -----------------------------------------------------------------------

    def register_version(self, version: str, *, stage: str, checkpoint_path: str, checksums: dict[str, str],
                         parent_version: str | None = None, metrics: dict | None = None,
                         status: str = "candidate", role: str | None = None) -> ModelVersion:
        """Add a checkpoint (after its files are complete). Registering the same version again with the
        same files returns the existing row (a retried registration); with other files it raises.
        `role` defaults to "reward" for the rm stage and "policy" otherwise."""
        _check_status(status)
        role = role or ("reward" if stage == "rm" else "policy")
        if role not in MODEL_ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(MODEL_ROLES)}")
        with Session(self.engine, expire_on_commit=False) as session:
            existing = session.get(ModelVersion, version)
            if existing is not None:
                if existing.checkpoint_path != checkpoint_path or existing.checksums != checksums:
                    raise VersionConflict(f"model version {version} is registered with other files")
                return existing
            row = ModelVersion(version=version, parent_version=parent_version, stage=stage, role=role,
                               checkpoint_path=checkpoint_path, checksums=checksums, status=status,
                               metrics=metrics or {})
            session.add(row)
            session.commit()
            return row

    def set_status(self, version: str, status: str, *, metrics: dict | None = None) -> ModelVersion:
        """Move a version to `status`; `metrics` are merged into the recorded ones (evaluation results)."""
        _check_status(status)
        with Session(self.engine, expire_on_commit=False) as session:
            row = session.get(ModelVersion, version, with_for_update=True)
            if row is None:
                raise KeyError(f"no model version {version}")
            row.status = status
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            row.updated_at = utcnow()
            session.add(row)
            session.commit()
            return row

    def get_version(self, version: str) -> ModelVersion | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(ModelVersion, version)

    def list_versions(self, *, status: str | None = None, stage: str | None = None,
                      role: str | None = None) -> list[ModelVersion]:
        """Oldest first."""
        query = select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.version)
        if role is not None:
            query = query.where(ModelVersion.role == role)
        if status is not None:
            query = query.where(ModelVersion.status == status)
        if stage is not None:
            query = query.where(ModelVersion.stage == stage)
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.execute(query).scalars())

    # -- dataset snapshots --------------------------------------------------------------------

    def record_snapshot(self, *, kind: str, content_hash: str, counts: dict[str, int], path: str,
                        heldout_fraction: float, seed: int) -> DatasetSnapshot:
        with Session(self.engine, expire_on_commit=False) as session:
            row = DatasetSnapshot(kind=kind, content_hash=content_hash, counts=counts, path=path,
                                  heldout_fraction=heldout_fraction, seed=seed)
            session.add(row)
            session.commit()
            return row

    def list_snapshots(self, kind: str | None = None) -> list[DatasetSnapshot]:
        query = select(DatasetSnapshot).order_by(DatasetSnapshot.id)
        if kind is not None:
            query = query.where(DatasetSnapshot.kind == kind)
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.execute(query).scalars())


def _check_status(status: str) -> None:
    if status not in MODEL_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(MODEL_STATUSES)}")


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


__all__ = ["FeedbackStore", "WriteResult", "DeadLetterRecord", "VersionConflict", "Rejected"]
