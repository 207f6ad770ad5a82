"""Tiny ranking datasets and recipes for the reward-model tests."""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from tests.trainer.sft_fixtures import CONFIGS, write_jsonl
from trainer.config import RMConfig, load_config

RANKINGS = [
    {"prompt": "Say hello.", "completions": ["Hello there!", "Hi.", "Go away."]},
    {"prompt": [{"role": "user", "content": "Name a colour."}], "completions": ["Blue.", "Table."]},
    {"prompt": "Count to three.", "completions": ["One, two, three.", "One, three.", "Three.", "No."]},
    {"prompt": "What is 2 + 2?", "completions": ["Four.", "Five."]},
    {"prompt": "Name a fruit.", "completions": ["An apple.", "A chair."]},
    {"prompt": "Say goodbye.", "completions": ["Goodbye!", "Hello?", "What?"]},
]

# The synthetic preference of the learning test: a completion's rank is set by the one marker word it
# holds, best first (none is between cherry and rotten); the rest of the answer is the same.
MARKERS = [" banana", " cherry", "", " rotten"]
SUBJECTS = ["The cat", "My friend", "A farmer", "The teacher", "Our neighbour", "The child", "A sailor",
            "The baker", "My sister", "The pilot", "A doctor", "The king"]
VERBS = ["eats", "likes", "paints", "sells", "buys", "finds", "draws", "wants"]
PLACES = ["at home", "in the park", "on Monday", "by the sea", "every day", "with joy"]


def marker_groups(n: int, seed: int) -> list[dict]:
    """`n` rankings of K = 2..4 variants of one short answer, ordered by their marker (MARKERS)."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n):
        answer = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} bread {rng.choice(PLACES)}."
        words = answer.split(" ")
        cut = rng.randrange(2, len(words))  # the marker goes inside the answer, not always last
        levels = sorted(rng.sample(range(len(MARKERS)), rng.randint(2, 4)))
        completions = [" ".join(words[:cut]) + MARKERS[level] + " " + " ".join(words[cut:]) for level in levels]
        groups.append({"prompt": f"Tell me about {rng.choice(SUBJECTS).lower()}.", "completions": completions})
    return groups


def tiny_rm_config(tmp_path: Path, model_dir: Path, records=RANKINGS, **overrides) -> RMConfig:
    """rm-tiny.yaml pointed at `model_dir`, a training file of `records` and `tmp_path/run`.

    overrides: section → dict of fields, e.g. optim={"grad_accumulation": 2}, or top-level fields.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = load_config(CONFIGS / "rm-tiny.yaml")
    train = write_jsonl(tmp_path / "rm.train.jsonl", records)
    data = {"train": str(train), **overrides.pop("data", {})}
    run = {"output_dir": str(tmp_path / "run"), **overrides.pop("run", {})}
    optim = overrides.pop("optim", {})
    return replace(config, model=str(model_dir), data=replace(config.data, **data),
                   run=replace(config.run, **run), optim=replace(config.optim, **optim), **overrides)
