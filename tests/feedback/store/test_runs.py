"""Training runs: created, updated, resumed by status; feedback counted since a run's data cut-off."""
from __future__ import annotations

from datetime import timedelta

import pytest

from feedback.store.runs import TrainingRuns
from feedback.store.types import utcnow
from tests.feedback.store.events import comparison, rating, served
from trainer.loop.plan import preferences


def test_a_run_records_its_progress_and_the_active_one_is_found(store):
    runs = TrainingRuns(store)
    assert runs.active() is None and runs.latest() is None
    cut = utcnow()
    runs.create("run-1", plan=["rm", "ppo"], trigger={"comparisons": 40}, data_until=cut,
                base_policy_version="base-1", base_reward_version="rm-0")
    assert runs.active().run_id == "run-1" and runs.latest() is None  # running: its data is not used up yet
    runs.update("run-1", stage="rm", snapshots={"rm": {"hash": "ab"}})
    runs.update("run-1", stage="ppo", snapshots={"prompts": {"hash": "cd"}}, metrics={"rm_accuracy": 0.8})
    row = runs.update("run-1", status="rejected", report={"passed": False, "gates": []}, metrics={"win_rate": 0.4})
    assert row.finished_at is not None and row.snapshots == {"rm": {"hash": "ab"}, "prompts": {"hash": "cd"}}
    assert row.metrics == {"rm_accuracy": 0.8, "win_rate": 0.4} and row.data_until == cut
    assert runs.active() is None and runs.latest().run_id == "run-1"
    runs.create("run-2", plan=["rm"], trigger={}, data_until=utcnow(), base_policy_version=None,
                base_reward_version=None)
    runs.update("run-2", status="failed", error="boom")
    assert runs.latest().run_id == "run-1"  # a failed run did not use its data
    assert [r.run_id for r in runs.list()] == ["run-2", "run-1"]
    with pytest.raises(ValueError, match="status"):
        runs.update("run-2", status="exploded")
    with pytest.raises(KeyError):
        runs.update("nope", stage="rm")


def test_feedback_is_counted_by_ingestion_time(store):
    runs = TrainingRuns(store)
    before = utcnow() - timedelta(seconds=1)
    store.write_events([served("c1"), served("c2", response="5"), rating("c1", 1),
                        comparison("c1", "c2", "a"), comparison("c1", "c2", "b"),
                        comparison("c1", "c2", "tie"), comparison("c1", "c2", "both_bad")])
    counts = runs.feedback_since(before)
    # ties and both_bad carry no preference: counted apart, not towards min_preferences
    assert counts == {"demonstrations": 0, "comparisons": 2, "comparisons_without_preference": 2, "rankings": 0,
                      "ratings": 1}
    assert preferences(counts) == 3
    assert runs.feedback_since(utcnow()) == {"demonstrations": 0, "comparisons": 0, "comparisons_without_preference": 0,
                                             "rankings": 0, "ratings": 0}
    assert runs.feedback_since(None)["comparisons"] == 2
