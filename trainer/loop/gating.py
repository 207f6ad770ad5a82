"""The run's gate report: trainer/gates.py measured on this run's candidates and held-out files.

The report stored on the run is `GateReport.to_dict()` plus the reward model's own verdict
(`reward_passed`, `reward_reasons`): the RM is promoted on its gate alone (serving swaps it
independently), the policy on all of them.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from feedback.store.tables import TrainingRun
from trainer.gates import evaluate_gates, load_gates_config

log = logging.getLogger(__name__)


def run_gates(executor, run: TrainingRun, data: Path, outputs: dict[str, Path]) -> dict:
    config = load_gates_config(_gates_path(executor.config.gates))
    overrides = {k: v for k, v in (("device", executor.config.device), ("dtype", executor.config.dtype)) if v}
    # feedback is as long as the public API allowed: a long held-out record is left out, not a failed gate
    config = dataclasses.replace(config, too_long="skip", **overrides)
    serving = executor.serving_checkpoint("policy")
    candidate = next((outputs[s] for s in ("ppo", "dpo", "sft") if s in outputs), None)
    current_rm = _trained(executor, executor.serving_checkpoint("reward"))
    report = evaluate_gates(candidate or serving, serving, outputs.get("sft") or executor.sft_checkpoint(),
                            outputs.get("rm"), current_rm, rm_heldout=_records(data / "rm.heldout.jsonl"),
                            prompts=_records(data / "prompts.heldout.jsonl"),
                            ptx=_records(data / "ptx.heldout.jsonl") or _records(data / "ptx.train.jsonl"),
                            config=config)
    out = report.to_dict()
    rm_gate = report.gate("rm_accuracy")
    if rm_gate.status == "disabled":
        out["reward_passed"], out["reward_reasons"] = report.passed, list(report.reasons)
    else:
        out["reward_passed"] = rm_gate.status == "passed"
        out["reward_reasons"] = [] if out["reward_passed"] else [f"rm_accuracy: {rm_gate.detail}"]
    if candidate is None:  # only the RM was trained: the policy gates measured the serving policy itself
        out["policy_candidate"] = None
    log.info("gates", extra={"fl_run_id": run.run_id, "fl_summary": report.summary()})
    return out


def _gates_path(value: str) -> Path:
    from trainer.loop.config import resolve

    return resolve(value)


def _records(path: Path) -> Path | None:
    return path if path.exists() and path.stat().st_size > 0 else None


def _trained(executor, path: Path | None) -> Path | None:
    """The serving reward checkpoint if it is a trained one (stage rm); the untrained head a gateway
    starts with judges nothing."""
    if path is None:
        return None
    state = executor.registry.deployment("reward")
    row = executor.store.get_version(state.serving_version) if state else None
    return path if row is not None and row.stage == "rm" else None
