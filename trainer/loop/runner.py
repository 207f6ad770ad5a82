"""One training run of the loop, top to bottom, resumable at every step.

    1. snapshot: export the sft, rm, prompts and ptx datasets once (a resumed run reuses them: its
       stages' resumable states were made from exactly these files);
    2. stages, in the planned order, each into `<run>/<stage>/`: a stage whose checkpoint exists is
       done; one with a saved training state resumes from it; each checkpoint is registered as a
       candidate version;
    3. gates: the candidates against what serves now (trainer/gates.py), report stored on the run;
    4. decision: promote (or canary, or leave for a person) when the gates pass; otherwise keep the
       candidates, marked rejected with the reasons.

Where each stage starts (InstructGPT, per run, on all feedback so far): SFT from the base model;
the reward model from the SFT checkpoint; the policy (PPO-ptx or DPO) from the SFT checkpoint with
the SFT checkpoint as the frozen reference. "The SFT checkpoint" is this run's, else the newest
registered one, else the base model.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from feedback.datasets.export import export
from feedback.store.registry import ModelRegistry
from feedback.store.runs import TrainingRuns
from feedback.store.store import FeedbackStore
from feedback.store.tables import TrainingRun
from serving.checkpoint import read_manifest
from trainer.config import load_config
from trainer.loop.config import LoopConfig
from trainer.loop.decision import decide_and_apply
from trainer.loop.gating import run_gates

log = logging.getLogger(__name__)

KINDS = ("sft", "rm", "prompts", "ptx")
POLICY_STAGES = ("sft", "ppo", "dpo")


class StageSkipped(Exception):
    """A planned stage that its data cannot support (e.g. DPO with no comparisons): recorded, not fatal."""


class RunExecutor:
    def __init__(self, store: FeedbackStore, config: LoopConfig, runs_dir: Path, stage_runners: dict | None = None):
        self.store = store
        self.registry = ModelRegistry(store)
        self.runs = TrainingRuns(store)
        self.config = config
        self.runs_dir = Path(runs_dir)
        self._stage_runners = stage_runners

    def execute(self, run: TrainingRun) -> TrainingRun:
        run_dir = self.runs_dir / run.run_id
        data = run_dir / "data"
        log.info("run starts", extra={"fl_run_id": run.run_id, "fl_plan": run.plan, "fl_attempt": run.attempts})

        # 1. snapshot
        if set(run.snapshots) != set(KINDS) or not all((data / f"{k}.train.jsonl").exists() for k in KINDS):
            snapshots = {}
            for kind in KINDS:
                result = export(self.store, kind, data, self.config.heldout_fraction, self.config.seed, progress=False)
                snapshots[kind] = {"hash": result.content_hash, "counts": result.counts, "path": str(data)}
            run = self.runs.update(run.run_id, snapshots=snapshots)

        # 2. stages
        outputs: dict[str, Path] = {}
        skipped: dict[str, str] = dict(run.metrics.get("skipped", {}))
        for stage in run.plan:
            if stage in skipped:
                continue
            run = self.runs.update(run.run_id, stage=stage)
            try:
                outputs[stage] = self._stage(run, stage, data, outputs)
            except StageSkipped as why:
                skipped[stage] = str(why)
                log.warning("stage skipped", extra={"fl_run_id": run.run_id, "fl_stage": stage, "fl_reason": str(why)})
                run = self.runs.update(run.run_id, metrics={"skipped": skipped})
                continue
            manifest = read_manifest(outputs[stage])
            self.store.register_version(manifest["model_version"], stage=stage, checkpoint_path=str(outputs[stage]),
                                        checksums=manifest["files"], parent_version=manifest.get("parent_version"),
                                        metrics=manifest.get("metrics", {}))
            field = "reward_version" if stage == "rm" else "policy_version"
            run = self.runs.update(run.run_id, **{field: manifest["model_version"]},
                                   metrics={stage: _summary(manifest.get("metrics", {}))})

        if run.policy_version is None and run.reward_version is None:
            return self.runs.update(run.run_id, status="failed", stage=None,
                                    error="no stage produced a checkpoint: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

        # 3. gates
        run = self.runs.update(run.run_id, stage="gates")
        report = run_gates(self, run, data, outputs)
        run = self.runs.update(run.run_id, report=report)

        # 4. decision
        status = decide_and_apply(self, run, report)
        return self.runs.update(run.run_id, status=status, stage=None)

    # -- stages -------------------------------------------------------------------------------
    def _stage(self, run: TrainingRun, stage: str, data: Path, outputs: dict[str, Path]) -> Path:
        out = self.runs_dir / run.run_id / stage
        checkpoint = out / "checkpoint"
        if (checkpoint / "manifest.json").exists():
            return checkpoint  # done before a crash
        config = self._stage_config(stage, run, data, outputs, out)
        resume = _has_state(out)
        log.info("stage starts", extra={"fl_run_id": run.run_id, "fl_stage": stage, "fl_resume": resume,
                                        "fl_output": str(out)})
        return Path(self._runner(stage)(config, resume=resume))

    def _runner(self, stage: str):
        if self._stage_runners and stage in self._stage_runners:
            return self._stage_runners[stage]
        from trainer.cli import STAGE_RUNNERS

        return STAGE_RUNNERS[stage]()

    def _stage_config(self, stage: str, run: TrainingRun, data: Path, outputs: dict[str, Path], out: Path):
        recipe = load_config(self.config.recipe(stage))
        # The public API takes longer prompts than a recipe trains on: such a record is skipped (and
        # counted in the stage's metrics), never a failed run — it would fail every later run too.
        recipe = replace(recipe, data=replace(recipe.data, too_long="skip"))
        run_cfg = replace(recipe.run, output_dir=str(out),
                          device=self.config.device or recipe.run.device, dtype=self.config.dtype or recipe.run.dtype)
        files = {kind: (data / f"{kind}.train.jsonl", data / f"{kind}.heldout.jsonl") for kind in KINDS}
        train, heldout = lambda k: str(files[k][0]), lambda k: (str(files[k][1]) if _lines(files[k][1]) else None)
        sft = str(outputs.get("sft") or self.sft_checkpoint())
        if stage == "sft":
            _need(files["sft"][0], "no demonstrations")
            return replace(recipe, model=str(self.base_checkpoint()), run=run_cfg,
                           data=replace(recipe.data, train=train("sft"), heldout=heldout("sft")))
        if stage == "rm":
            _need(files["rm"][0], "no comparisons, rankings or thumb pairs to train on")
            return replace(recipe, model=sft, policy=sft, run=run_cfg,
                           data=replace(recipe.data, train=train("rm"), heldout=heldout("rm"),
                                        demonstrations=train("sft") if _lines(files["sft"][0]) else None))
        if stage == "dpo":
            _need(files["rm"][0], "no comparisons, rankings or thumb pairs to train on")
            return replace(recipe, model=sft, reference=None, run=run_cfg,
                           data=replace(recipe.data, train=train("rm"), heldout=heldout("rm")))
        if stage == "ppo":
            _need(files["prompts"][0], "no prompts")
            reward = outputs.get("rm") or self.trained_reward_checkpoint()
            if reward is None:
                raise StageSkipped("no trained reward model (none refreshed in this run, none serving)")
            ptx = train("ptx") if _lines(files["ptx"][0]) else None
            ptx_coef = recipe.ptx_coef if ptx else 0.0
            return replace(recipe, policy=sft, reference=sft, reward_model=str(reward), ptx_coef=ptx_coef, run=run_cfg,
                           data=replace(recipe.data, train=train("prompts"), heldout=heldout("prompts"), ptx=ptx))
        raise ValueError(f"unknown stage {stage!r}")

    # -- where things are ---------------------------------------------------------------------
    def serving_checkpoint(self, role: str) -> Path | None:
        state = self.registry.deployment(role)
        if state is None:
            return None
        return Path(self.store.get_version(state.serving_version).checkpoint_path)

    def base_checkpoint(self) -> Path:
        """The base policy: the oldest registered policy of stage `base` (what the platform first served)."""
        bases = self.store.list_versions(stage="base", role="policy")
        if bases:
            return Path(bases[0].checkpoint_path)
        current = self.serving_checkpoint("policy")
        if current is None:
            raise RuntimeError("no policy is deployed yet: start the gateway (feedloop serve / up) first")
        return current

    def sft_checkpoint(self) -> Path:
        sfts = [v for v in self.store.list_versions(stage="sft", role="policy") if v.status != "rejected"]
        return Path(sfts[-1].checkpoint_path) if sfts else self.base_checkpoint()

    def trained_reward_checkpoint(self) -> Path | None:
        """The serving reward model if it was trained (stage rm), else the newest non-rejected one."""
        state = self.registry.deployment("reward")
        if state is not None:
            row = self.store.get_version(state.serving_version)
            if row is not None and row.stage == "rm":
                return Path(row.checkpoint_path)
        trained = [v for v in self.store.list_versions(stage="rm") if v.status != "rejected"]
        return Path(trained[-1].checkpoint_path) if trained else None


def _has_state(out: Path) -> bool:
    from trainer.checkpointing import latest_training_state

    return (out / "state").exists() and latest_training_state(out) is not None


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _need(path: Path, why: str) -> None:
    if not _lines(path):
        raise StageSkipped(why)


def _summary(metrics: dict) -> dict:
    """The numbers worth keeping on the run row (the manifest keeps everything)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
