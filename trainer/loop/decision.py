"""After the gates: promote, canary, leave for a person, or reject — written into the registry.

The reward model and the policy are decided separately (serving swaps them independently): a
refreshed RM that passes its own gate serves `/v1/score` even when the policy trained against it
fails its gates; a policy candidate serves only when every gate passed.
"""
from __future__ import annotations

import logging

from feedback.store.tables import TrainingRun

log = logging.getLogger(__name__)


def decide_and_apply(executor, run: TrainingRun, report: dict) -> str:
    """Apply the report's verdicts to the registry; returns the run's final status."""
    registry, config = executor.registry, executor.config
    why = f"run {run.run_id}"
    reasons = list(report.get("reasons", []))

    if run.reward_version is not None:
        if report.get("reward_passed", report.get("passed", False)):
            if config.promotion == "manual":
                log.info("reward model left for manual promotion", extra={"fl_version": run.reward_version})
            else:  # a reward model has no canary (scores are not traffic): promote directly
                registry.promote(run.reward_version, actor="loop", reason=f"{why}: reward-model gates passed")
        else:
            registry.reject(run.reward_version, report.get("reward_reasons") or reasons, actor="loop")

    if run.policy_version is None:
        return "succeeded" if report.get("reward_passed", report.get("passed", False)) else "rejected"
    if not report.get("passed", False):
        registry.reject(run.policy_version, reasons or ["gates failed"], actor="loop")
        log.warning("candidate rejected", extra={"fl_run_id": run.run_id, "fl_version": run.policy_version,
                                                 "fl_reasons": reasons})
        return "rejected"
    if config.promotion == "auto":
        registry.promote(run.policy_version, actor="loop", reason=f"{why}: gates passed")
        status = "promoted"
    elif config.promotion == "canary":
        registry.start_canary(run.policy_version, config.canary_percent, actor="loop", reason=f"{why}: gates passed")
        status = "canary"
    else:
        status = "succeeded"
    log.info("candidate passed the gates", extra={"fl_run_id": run.run_id, "fl_version": run.policy_version,
                                                  "fl_status": status})
    return status
