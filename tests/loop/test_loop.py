"""The trainer loop in-process on a tiny model: plans, runs RM + DPO/PPO on the store's feedback,
gates, promotes or rejects, records everything on the run; and resumes a run killed mid-stage."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from feedback.store import FeedbackStore
from feedback.store.registry import ModelRegistry
from feedback.store.runs import TrainingRuns
from tests.loop.fixtures import deploy, tiny_recipes, write_preferences
from trainer.loop.config import LoopConfig, load_loop_config
from trainer.loop.plan import plan_run
from trainer.loop.service import LoopBusy, LoopService

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_plan_follows_the_thresholds_and_the_schedule():
    config = LoopConfig(min_preferences=10, min_demonstrations=5, policy_stage="ppo")
    assert plan_run({"comparisons": 9}, config, last_run_at=None, now=T0) is None
    t = plan_run({"comparisons": 6, "ratings": 4}, config, last_run_at=None, now=T0)
    assert t.stages == ("rm", "ppo") and "10 new preferences" in t.reason
    t = plan_run({"demonstrations": 5, "rankings": 10}, config, last_run_at=None, now=T0)
    assert t.stages == ("sft", "rm", "ppo")
    assert plan_run({"demonstrations": 5}, LoopConfig(min_demonstrations=5, policy_stage="dpo"),
                    last_run_at=None, now=T0).stages == ("sft", "dpo")
    scheduled = LoopConfig(min_preferences=10, max_interval_seconds=3600)
    assert plan_run({"comparisons": 1}, scheduled, last_run_at=T0, now=T0 + timedelta(minutes=59)) is None
    t = plan_run({"comparisons": 1}, scheduled, last_run_at=T0, now=T0 + timedelta(hours=1))
    assert t.stages == ("rm", "ppo") and t.reason.startswith("schedule")
    assert plan_run({}, scheduled, last_run_at=T0, now=T0 + timedelta(days=9)) is None  # nothing new: no run


def test_bad_loop_recipes_fail_clearly(tmp_path):
    from trainer.config import ConfigError

    (tmp_path / "loop.yaml").write_text("policy_stage: reinforce\n")
    with pytest.raises(ConfigError, match="policy_stage must be 'ppo' or 'dpo'"):
        load_loop_config(tmp_path / "loop.yaml")
    (tmp_path / "loop.yaml").write_text("min_prefs: 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_loop_config(tmp_path / "loop.yaml")
    assert load_loop_config(None).policy_stage == "ppo"  # the shipped default parses


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(f"sqlite:///{tmp_path / 'feedloop.db'}")
    s.migrate()
    yield s
    s.close()


def test_loop_trains_gates_and_promotes_and_records_the_run(tmp_path, store, tiny_model_dir):
    base = deploy(store, tiny_model_dir)
    service = LoopService(store, load_loop_config(tiny_recipes(tmp_path / "recipes")), tmp_path / "runs")
    assert service.tick() is None  # nothing to learn from yet
    compared = write_preferences(store, demos=1)
    assert compared >= 10

    run = service.tick()
    assert run.status == "promoted", (run.error, run.report)
    assert run.plan == ["rm", "dpo"] and run.attempts == 1 and run.finished_at is not None
    assert run.trigger["counts"]["comparisons"] == compared and run.base_policy_version == base
    assert set(run.snapshots) == {"sft", "rm", "prompts", "ptx"}
    assert all(len(s["hash"]) == 64 for s in run.snapshots.values())
    # The report holds every gate, measured (lenient thresholds: all pass).
    gates = {g["name"]: g for g in run.report["gates"]}
    assert set(gates) == {"rm_accuracy", "win_rate", "kl", "ptx"}
    assert all(g["status"] == "passed" and g["value"] is not None for g in gates.values()), gates
    assert gates["kl"]["value"] > 0  # DPO moved the policy away from its reference
    assert run.report["reward_passed"] is True
    # The registry serves the new policy and reward model; versions remember their parents.
    registry = ModelRegistry(store)
    assert registry.deployment("policy").serving_version == run.policy_version
    assert registry.deployment("reward").serving_version == run.reward_version
    policy = store.get_version(run.policy_version)
    assert (policy.stage, policy.status, policy.role) == ("dpo", "serving", "policy")
    assert Path(policy.checkpoint_path).is_relative_to(tmp_path / "runs" / run.run_id)
    assert store.get_version(run.reward_version).stage == "rm"
    assert run.metrics["rm"]["heldout_accuracy"] is not None and "dpo" in run.metrics
    assert service.tick() is None  # the feedback is used up: no new run until more arrives
    assert TrainingRuns(store).latest().run_id == run.run_id


def test_the_default_recipe_sft_rm_ppo_chains_its_checkpoints(tmp_path, store, tiny_model_dir):
    """The InstructGPT order on new demonstrations and comparisons: SFT from the base, the RM and the
    PPO policy from that SFT checkpoint (the PPO reference too), the policy judged by the new RM.
    Feedback on prompts longer than the recipes' max_length (the API accepts them) is left out and
    counted, not a failed run."""
    base = deploy(store, tiny_model_dir)
    write_preferences(store, prompts=8, demos=2, long_prompts=4)
    recipes = tiny_recipes(tmp_path / "recipes", policy_stage="ppo", min_demonstrations=10)
    run = LoopService(store, load_loop_config(recipes), tmp_path / "runs").tick()
    assert run.plan == ["sft", "rm", "ppo"] and run.status == "promoted", (run.error, run.report)
    sft = [v for v in store.list_versions(stage="sft")][-1]
    assert sft.parent_version == base and sft.status == "candidate"
    policy = store.get_version(run.policy_version)
    assert policy.stage == "ppo" and policy.parent_version == sft.version
    assert store.get_version(run.reward_version).parent_version == sft.version
    assert run.report["models"]["reference"] == sft.version
    assert run.report["models"]["candidate_rm"] == run.report["gates"][1]["info"]["judge"] == run.reward_version
    assert {"sft", "rm", "ppo"} <= set(run.metrics)
    skipped = {stage: sum(v for k, v in run.metrics[stage].items() if k.startswith("skipped_too_long_"))
               for stage in ("sft", "rm", "ppo")}
    # 4 long prompts × (2 demonstrations | 1 ranking group | 1 prompt), split between train and held-out
    assert skipped == {"sft": 8, "rm": 4 + 8, "ppo": 4}, run.metrics  # rm: its demonstrations too
    assert all(g["status"] == "passed" for g in run.report["gates"]), run.report


def test_a_failing_gate_keeps_the_candidate_rejected_with_its_reasons(tmp_path, store, tiny_model_dir):
    base = deploy(store, tiny_model_dir)
    write_preferences(store)
    recipes = tiny_recipes(tmp_path / "recipes", gates={"kl_budget": 0.0})  # any move away from SFT fails
    run = LoopService(store, load_loop_config(recipes), tmp_path / "runs").tick()
    assert run.status == "rejected"
    assert run.report["passed"] is False and any(r.startswith("kl:") for r in run.report["reasons"])
    candidate = store.get_version(run.policy_version)
    assert candidate.status == "rejected" and any("kl" in r for r in candidate.metrics["rejected_reasons"])
    registry = ModelRegistry(store)
    assert registry.deployment("policy").serving_version == base  # never served
    # The reward model passed its own gate and is swapped in independently.
    assert registry.deployment("reward").serving_version == run.reward_version


def test_one_loop_per_runs_directory(tmp_path, store):
    config = LoopConfig()
    first = LoopService(store, config, tmp_path / "runs")
    first.acquire()
    with pytest.raises(LoopBusy):
        LoopService(store, config, tmp_path / "runs").acquire()
    first.release()
    LoopService(store, config, tmp_path / "runs").acquire()


def test_a_run_killed_mid_stage_resumes_where_it_stopped(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "data"
    store = FeedbackStore(f"sqlite:///{data_dir / 'feedloop.db'}")
    store.migrate()
    deploy(store, tiny_model_dir)
    write_preferences(store, prompts=16, answers=4)
    # Many small DPO steps (~190: batches of one group, 4 epochs) with a saved state every 10: the kill
    # lands inside the stage on a quiet machine too (the whole stage takes seconds there).
    recipes = tiny_recipes(tmp_path / "recipes", gates={"min_win_rate": None, "ptx_margin": None})
    dpo = (tmp_path / "recipes" / "dpo.yaml")
    dpo.write_text(dpo.read_text().replace("batch_size: 4", "batch_size: 1").replace("epochs: 1", "epochs: 4"))
    argv = [sys.executable, "-m", "serving.cli", "loop", "--once", "--config", str(recipes), "--data-dir", str(data_dir),
            "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        states = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            states = list((data_dir / "runs").glob("run-*/dpo/state/step-*/position.json"))
            if states:
                break
            time.sleep(0.02)
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    runs = TrainingRuns(store)
    interrupted = runs.active()
    assert interrupted is not None and interrupted.stage == "dpo" and interrupted.attempts == 1
    assert not list((data_dir / "runs").glob("run-*/dpo/checkpoint"))

    second = subprocess.run(argv[:-1] + ["INFO"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    run = runs.get(interrupted.run_id)
    assert run.attempts == 2 and run.status in ("promoted", "rejected"), (run.status, run.error)
    assert json.loads(second.stdout.strip().splitlines()[-1])["run_id"] == run.run_id
    # The rerun resumed the run (not a new one), skipped the finished RM stage, and continued DPO from its
    # newest saved state rather than from scratch.
    logs = [json.loads(line) for line in second.stderr.splitlines() if line.startswith("{")]
    started = {entry["stage"]: entry for entry in logs if entry.get("msg") == "stage starts"}
    assert "rm" not in started and started["dpo"]["resume"] is True, started
    resumed = [e["msg"] for e in logs if e.get("msg", "").startswith("resuming from")]
    assert resumed and "step" in resumed[0], logs[-20:]
    store.close()
