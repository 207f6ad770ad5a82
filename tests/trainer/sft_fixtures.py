"""Tiny SFT datasets and recipes for the trainer tests."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from trainer.config import SFTConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"

DEMONSTRATIONS = [
    {"prompt": "Say hello.", "response": "Hello there!"},
    {"prompt": [{"role": "user", "content": "Name a colour."}], "response": "Blue."},
    {"prompt": "Count to three.", "response": "One, two, three."},
    {"prompt": "What is 2 + 2?", "response": "Four."},
    {"prompt": "Name a fruit.", "response": "An apple."},
    {"prompt": "Say goodbye.", "response": "Goodbye!"},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def tiny_sft_config(tmp_path: Path, model_dir: Path, records=DEMONSTRATIONS[:4], **overrides) -> SFTConfig:
    """sft-tiny.yaml pointed at `model_dir`, a training file of `records` and `tmp_path/run`.

    overrides: section → dict of fields, e.g. optim={"grad_accumulation": 2}, or top-level fields.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = load_config(CONFIGS / "sft-tiny.yaml")
    train = write_jsonl(tmp_path / "sft.train.jsonl", records)
    data = {"train": str(train), **overrides.pop("data", {})}
    run = {"output_dir": str(tmp_path / "run"), **overrides.pop("run", {})}
    optim = overrides.pop("optim", {})
    return replace(config, model=str(model_dir), data=replace(config.data, **data),
                   run=replace(config.run, **run), optim=replace(config.optim, **optim), **overrides)
