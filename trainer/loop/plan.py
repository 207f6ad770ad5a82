"""Whether a run is due, and which stages it runs: a pure function of the feedback counts.

InstructGPT's order: SFT on demonstrations, then the reward model on comparisons, then the policy
against it. New demonstrations call for SFT; new preferences (comparisons, rankings, thumbs) call
for an RM refresh; either way the policy stage follows, so what was learnt reaches the answers.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from trainer.loop.config import LoopConfig


@dataclass(frozen=True)
class Trigger:
    stages: tuple[str, ...]
    reason: str
    counts: dict[str, int]

    def to_dict(self) -> dict:
        return {"stages": list(self.stages), "reason": self.reason, "counts": self.counts}


def preferences(counts: dict[str, int]) -> int:
    return counts.get("comparisons", 0) + counts.get("rankings", 0) + counts.get("ratings", 0)


def plan_run(counts: dict[str, int], config: LoopConfig, *, last_run_at: datetime | None,
             now: datetime) -> Trigger | None:
    """`counts`: feedback ingested since the last run's data cut-off (TrainingRuns.feedback_since).
    None: nothing to do yet."""
    demos, prefs = counts.get("demonstrations", 0), preferences(counts)
    stages: list[str] = []
    reasons: list[str] = []
    if demos >= config.min_demonstrations:
        stages.append("sft")
        reasons.append(f"{demos} new demonstrations >= {config.min_demonstrations}")
    if prefs >= config.min_preferences:
        stages.append("rm")
        reasons.append(f"{prefs} new preferences >= {config.min_preferences}")
    if not stages and config.max_interval_seconds is not None and (demos or prefs):
        waited = None if last_run_at is None else (now - last_run_at).total_seconds()
        if waited is None or waited >= config.max_interval_seconds:
            stages = (["sft"] if demos else []) + (["rm"] if prefs else [])
            reasons.append(f"schedule: {demos} demonstrations and {prefs} preferences since the last run"
                           + ("" if waited is None else f" {waited:.0f} s ago"))
    if not stages:
        return None
    stages.append(config.policy_stage)
    return Trigger(tuple(stages), "; ".join(reasons), dict(counts))
