"""The whole platform, end to end, as a user runs it: `feedloop up` on a tiny policy; simulated users
compare answers through the public API by a preference rule the test defines, with 20 % label noise;
the loop trains (RM refresh + DPO), gates and promotes; a steady load runs the whole time.

Asserted: zero failed requests across the swap; answers after the swap carry the new version; the
new policy wins on the rule against the old one on fresh prompts clearly more often than not; the
run report holds every gate's value.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from feedback.store import FeedbackStore
from feedback.store.registry import ModelRegistry
from feedback.store.runs import TrainingRuns
from serving.checkpoint import model_version_of
from simulate.load import SteadyLoad
from simulate.rules import prefers_banana
from simulate.users import Mix, SimulatedUsers, SimulationConfig
from tests.loop.fixtures import MARKER, TOPICS, WORDS, tiny_recipes

TRAIN_TOPICS = TOPICS[:12]
FRESH_TOPICS = ["owls", "maps", "lamps", "coins", "caves", "kites", "ponds", "forks", "hats", "drums", "shells",
                "bells", "nests", "tiles", "jars", "gates"]


@pytest.fixture(scope="module")
def word_policy(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model after SFT on answers of 6 words drawn from WORDS: it writes the marker word about
    once per answer, so answers differ on the rule and comparisons carry signal."""
    from tests.trainer.sft_fixtures import tiny_sft_config
    from trainer.sft import run_sft

    rng = random.Random(0)
    demos = [{"prompt": [{"role": "user", "content": f"Tell me about {rng.choice(TOPICS + FRESH_TOPICS)}."}],
              "response": "ok" + "".join(rng.choice(WORDS) for _ in range(6))} for _ in range(48)]
    tmp = tmp_path_factory.mktemp("word-policy")
    return run_sft(tiny_sft_config(tmp, tiny_model_dir, records=demos, epochs=10, run={"save_every": 0}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"feedloop up exited ({process.returncode}) while waiting for {what}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_feedback_retrains_and_hot_swaps_the_policy_with_no_failed_request(tmp_path, word_policy):
    data_dir, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    # min_preferences counts comparisons with a winner: the rule ties ~58 % of pairs (as many markers
    # in both answers), so 160 comparisons give ~65 preferences: a run at 30, room for a second.
    # The RM gates are off here: a tiny RM refreshed on ~20 noisy pairs is at chance (held-out accuracy
    # 0.2-0.83 on 10-20 pairs over a dozen exports, 0.44 with the labels cleaned), so rm_accuracy, and
    # win_rate judged by that RM, decided promotion by coin flip and runs were rejected by turns. What
    # they guard is measured below with the rule itself (step 4); their pass/fail logic is tested in
    # tests/trainer/test_gates.py and tests/loop/test_loop.py.
    recipes = tiny_recipes(tmp_path / "recipes", policy_stage="dpo", min_preferences=30, poll_seconds=1,
                           gates={"rm_accuracy_margin": None, "min_win_rate": None, "kl_budget": 50.0,
                                  "ptx_margin": 1.0, "heldout_prompts": 16, "samples_per_prompt": 4})
    dpo = tmp_path / "recipes" / "dpo.yaml"
    dpo.write_text(dpo.read_text().replace("epochs: 1", "epochs: 3"))
    argv = [sys.executable, "-m", "serving.cli", "up", "--model", str(word_policy), "--data-dir", str(data_dir),
            "--port", str(port), "--no-grpc", "--loop-config", str(recipes), "--poll-interval", "0.5",
            "--device", "cpu", "--log-level", "WARNING"]
    log_file = open(tmp_path / "up.log", "w")
    up = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    old = model_version_of(word_policy)
    try:
        wait_for(lambda: _healthy(url), 180, "the gateway", up)
        load = asyncio.run(_scenario(url, up, old))
        new = load["new_version"]

        # 1. zero failed requests across the swap, and the swap happened under that load
        assert load["errors"] == 0, load["error_messages"]
        assert load["versions"].get(old, 0) > 0 and load["versions"].get(new, 0) > 0, load["versions"]
        # 2. answers to requests sent after the first new-version answer all carry the new version
        assert load["old_after_swap"] == 0, load
        # 3. the run that made it was promoted, and its report holds each gate's status and value
        store = FeedbackStore(f"sqlite:///{data_dir / 'feedloop.db'}")
        (run,) = [r for r in TrainingRuns(store).list() if r.policy_version == new]
        assert run.status == "promoted", (run.status, run.error)
        gates = {g["name"]: g for g in run.report["gates"]}
        assert {n: g["status"] for n, g in gates.items()} == {
            "rm_accuracy": "disabled", "win_rate": "disabled", "kl": "passed", "ptx": "passed"}, gates
        assert all(isinstance(gates[n]["value"], float) for n in ("kl", "ptx")), gates
        new_dir = Path(store.get_version(new).checkpoint_path)
        assert ModelRegistry(store).deployment("policy").serving_version == new
        store.close()
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        log_file.close()
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]

    # 4. the new policy wins on the rule, on prompts no one trained on
    wins, losses = head_to_head(new_dir, word_policy, tmp_path)
    assert wins > 1.5 * losses and wins >= 12, (wins, losses)


async def _scenario(url: str, up: subprocess.Popen, old: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        # A few demonstrations (the ptx gate's text), through the public API like everything else.
        for topic in TRAIN_TOPICS[:6]:
            r = await client.post("/v1/feedback", json={
                "type": "demonstration", "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
                "text": "ok" + MARKER + " red" + MARKER + " sun"})
            assert r.status_code == 202, r.text
        load = SteadyLoad(url, clients=2, api="tgi", prompt="Tell me about rivers.", max_new_tokens=8)
        await load.start()
        try:
            users = SimulatedUsers(url, prefers_banana, SimulationConfig(
                users=4, noise=0.2, events=160, mix=Mix(compare=1.0), seed=0, max_new_tokens=8,
                prompts=[f"Tell me about {t}." for t in TRAIN_TOPICS]))
            report = await users.run()
            assert report.total_accepted >= 150 and report.total_errors == 0, report.to_dict()
            new = await _wait_promoted(client, old, up)
            swapped = await _wait_served(load, new, up)
            await asyncio.sleep(3)  # steady state on the new version
        finally:
            await load.stop()
    late = [s for s in load.samples if s.started_at >= swapped]
    return {"new_version": new, "errors": load.errors(), "error_messages": dict(load.error_messages()),
            "versions": dict(load.versions()), "old_after_swap": sum(s.model_version == old for s in late),
            "after_swap": len(late)}


async def _wait_promoted(client: httpx.AsyncClient, old: str, up: subprocess.Popen, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert up.poll() is None, "feedloop up exited"
        r = await client.get("/v1/admin/deployments")
        policy = _policy_state(r.json())
        if policy and policy != old:
            return policy
        await asyncio.sleep(1)
    raise AssertionError("the loop did not promote a new policy in time")


async def _wait_served(load: SteadyLoad, version: str, up: subprocess.Popen, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert up.poll() is None, "feedloop up exited"
        first = load.first_answer_from(version)
        if first is not None:
            return first
        await asyncio.sleep(0.2)
    raise AssertionError(f"no answer from {version} within {timeout} s of its promotion")


def _policy_state(body: dict) -> str | None:
    """The registry's serving policy version from GET /v1/admin/deployments."""
    registry = body["policy"]["registry"]
    return registry["serving_version"] if registry else None


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def head_to_head(new_dir: Path, old_dir: Path, tmp_path: Path) -> tuple[int, int]:
    """Both policies answer the same fresh prompts with the same seeds; the rule judges each pair."""
    from serving.models import load_policy
    from trainer.evaluation import sample_answers

    prompts = tmp_path / "fresh.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {t}."}) + "\n" for t in FRESH_TOPICS))
    answers = {}
    for name, path in (("new", new_dir), ("old", old_dir)):
        rollouts = sample_answers(load_policy(path, device="cpu"), prompts, samples_per_prompt=4, max_new_tokens=8,
                                  seed=7, max_length=128)
        answers[name] = [prefers_banana(r.prompt, r.response_text) if isinstance(r.prompt, str)
                         else prefers_banana("", r.response_text) for r in rollouts]
    wins = sum(n > o for n, o in zip(answers["new"], answers["old"]))
    losses = sum(n < o for n, o in zip(answers["new"], answers["old"]))
    return wins, losses
