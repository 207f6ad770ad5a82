"""A store with a deployed tiny policy and marker-word preferences, and tiny loop recipes."""
from __future__ import annotations

import random
from pathlib import Path

import yaml

from feedback.store.registry import ModelRegistry
from serving.checkpoint import checksums, model_version_of
from tests.feedback.store.events import comparison, demonstration, served

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"
MARKER = " banana"
WORDS = [" red", " blue", " green", " cat", " dog", " sun", " moon", MARKER]
TOPICS = ["rivers", "cats", "stars", "bread", "music", "trees", "boats", "snow", "clocks", "bees", "glass",
          "roads", "tea", "paper", "wind", "salt"]


def prefers_marker(prompt: str, answer: str) -> float:
    return float(answer.count(MARKER.strip()))


def deploy(store, policy_dir: Path) -> str:
    version = model_version_of(policy_dir)
    ModelRegistry(store).ensure_deployed("policy", version, stage="base", checkpoint_path=str(policy_dir),
                                         checksums=checksums(policy_dir))
    return version


def write_preferences(store, *, prompts: int = 16, answers: int = 3, seed: int = 0, demos: int = 0,
                      tag: str = "", long_prompts: int = 0) -> int:
    """`answers` served completions per prompt, every pair compared by the marker rule (ties skipped).
    `long_prompts` more prompts of ~300 tokens (over the tiny recipes' max_length 128, as the public
    API allows). Returns the number of comparisons written."""
    rng = random.Random(seed)
    events, compared = [], 0
    topics = [f"Tell me about {t}." for t in TOPICS[:prompts]]
    topics += [f"Tell me everything about {t}: " + "and then what happened next? " * 40 for t in TOPICS[:long_prompts]]
    for p, prompt in enumerate(topics):
        ids = []
        for a in range(answers):
            cid = f"c{tag}-{p}-{a}"
            text = "ok" + "".join(rng.choice(WORDS) for _ in range(6))
            events.append(served(cid, prompt, text, model_version="base"))
            ids.append((cid, text))
        for i in range(answers):
            for j in range(i + 1, answers):
                (a, ta), (b, tb) = ids[i], ids[j]
                sa, sb = prefers_marker(prompt, ta), prefers_marker(prompt, tb)
                if sa != sb:
                    events.append(comparison(a, b, "a" if sa > sb else "b", comparison_id=f"cmp{tag}-{p}"))
                    compared += 1
        for d in range(demos):
            events.append(demonstration("ok" + MARKER * 2 + rng.choice(WORDS), prompt=prompt))
    result = store.write_events(events)
    assert not result.rejected, result.rejected
    return compared


def tiny_recipes(out: Path, *, policy_stage: str = "dpo", gates: dict | None = None, **loop) -> Path:
    """A loop recipe over the tiny stage recipes (few steps, CPU), written under `out`; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    overrides = {
        "sft": {"epochs": 2},
        "rm": {"epochs": 1, "data": {"batch_size": 4}},
        "dpo": {"epochs": 1, "data": {"batch_size": 4}},
        "ppo": {"epochs": 1, "data": {"batch_size": 8, "mini_batch_size": 4}},
    }
    for stage, changes in overrides.items():
        recipe = yaml.safe_load((CONFIGS / f"{stage}-tiny.yaml").read_text())
        for key, value in changes.items():
            if isinstance(value, dict):
                recipe[key].update(value)
            else:
                recipe[key] = value
        (out / f"{stage}.yaml").write_text(yaml.safe_dump(recipe))
    gate_config = {"rm_accuracy_margin": 1.0, "min_win_rate": 0.0, "kl_budget": 1.0e6, "ptx_margin": 1.0e6,
                   "heldout_prompts": 4, "max_new_tokens": 8, "max_length": 128, "batch_size": 8,
                   "device": "cpu", "dtype": "fp32", **(gates or {})}
    (out / "gates.yaml").write_text(yaml.safe_dump(gate_config))
    config = {"poll_seconds": 0.5, "min_preferences": 10, "min_demonstrations": 1000, "policy_stage": policy_stage,
              "sft_recipe": "sft.yaml", "rm_recipe": "rm.yaml", "ppo_recipe": "ppo.yaml", "dpo_recipe": "dpo.yaml",
              "gates": "gates.yaml", "heldout_fraction": 0.4, "device": "cpu", "dtype": "fp32", **loop}
    path = out / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
