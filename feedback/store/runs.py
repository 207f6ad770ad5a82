"""Training runs of the loop (`feedloop loop`): each has an id, a status, its data snapshots, the
candidates it produced, its gate report and metrics, so a crashed run is found and resumed, and
people can see why a candidate was (not) promoted. Also: how much feedback arrived since a time,
which is what decides that a new run is due.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback.store.store import FeedbackStore
from feedback.store.tables import (NO_PREFERENCE_WINNERS, PREFERENCE_WINNERS, RUN_STATUSES, Comparison, Demonstration,
                                   Ranking, Rating, TrainingRun)
from feedback.store.types import utcnow

FINISHED = ("succeeded", "canary", "promoted", "rejected")  # a run that used its data (failed runs did not)
FEEDBACK_TABLES = {"demonstrations": Demonstration, "comparisons": Comparison, "rankings": Ranking,
                   "ratings": Rating}


class TrainingRuns:
    def __init__(self, store: FeedbackStore) -> None:
        self.engine = store.engine

    def create(self, run_id: str, *, plan: list[str], trigger: dict, data_until: datetime,
               base_policy_version: str | None, base_reward_version: str | None) -> TrainingRun:
        with Session(self.engine, expire_on_commit=False) as session:
            row = TrainingRun(run_id=run_id, plan=list(plan), trigger=dict(trigger), data_until=data_until,
                              base_policy_version=base_policy_version, base_reward_version=base_reward_version,
                              stage=None, status="running")
            session.add(row)
            session.commit()
            return row

    def update(self, run_id: str, *, metrics: dict | None = None, snapshots: dict | None = None,
               **fields) -> TrainingRun:
        """Set `fields`; `metrics` and `snapshots` are merged into what is recorded. A final status
        stamps `finished_at`."""
        if "status" in fields and fields["status"] not in RUN_STATUSES:
            raise ValueError(f"run status {fields['status']!r} is not one of {', '.join(RUN_STATUSES)}")
        with Session(self.engine, expire_on_commit=False) as session:
            row = session.get(TrainingRun, run_id, with_for_update=True)
            if row is None:
                raise KeyError(f"no training run {run_id}")
            for key, value in fields.items():
                if not hasattr(row, key):
                    raise AttributeError(f"training runs have no field {key!r}")
                setattr(row, key, value)
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            if snapshots:
                row.snapshots = {**row.snapshots, **snapshots}
            now = utcnow()
            row.updated_at = now
            if fields.get("status") not in (None, "running"):
                row.finished_at = now
            session.add(row)
            session.commit()
            return row

    def get(self, run_id: str) -> TrainingRun | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(TrainingRun, run_id)

    def active(self) -> TrainingRun | None:
        """The run in progress (or interrupted by a crash): the loop resumes it before anything new."""
        with Session(self.engine, expire_on_commit=False) as session:
            return session.execute(select(TrainingRun).where(TrainingRun.status == "running")
                                   .order_by(TrainingRun.created_at).limit(1)).scalar_one_or_none()

    def latest(self, statuses: tuple[str, ...] = FINISHED) -> TrainingRun | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.execute(select(TrainingRun).where(TrainingRun.status.in_(statuses))
                                   .order_by(TrainingRun.created_at.desc()).limit(1)).scalar_one_or_none()

    def list(self, limit: int = 50) -> list[TrainingRun]:
        """Newest first."""
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.execute(select(TrainingRun).order_by(TrainingRun.created_at.desc())
                                        .limit(limit)).scalars())

    def feedback_since(self, since: datetime | None, until: datetime | None = None) -> dict[str, int]:
        """Feedback rows ingested in (since, until]: demonstrations, comparisons, rankings, ratings.
        `comparisons` counts those with a winner; ties and both_bad say nothing the reward model can
        learn (the export leaves them out), so they are counted apart, as `comparisons_without_preference`,
        and do not bring a run closer: users who tie most pairs would otherwise start runs on a
        fraction of the preferences `min_preferences` asks for."""
        counts = {}
        with self.engine.connect() as connection:
            def count(table, *where) -> int:
                query = select(func.count()).select_from(table).where(*where)
                if since is not None:
                    query = query.where(table.ingested_at > since)
                if until is not None:
                    query = query.where(table.ingested_at <= until)
                return connection.execute(query).scalar_one()

            for name, table in FEEDBACK_TABLES.items():
                if table is Comparison:
                    counts[name] = count(table, Comparison.winner.in_(PREFERENCE_WINNERS))
                    counts[f"{name}_without_preference"] = count(table, Comparison.winner.in_(NO_PREFERENCE_WINNERS))
                else:
                    counts[name] = count(table)
        return counts


__all__ = ["TrainingRuns", "FINISHED"]
