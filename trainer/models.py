"""Finding and loading the checkpoints the stages start from (shared by sft, rm, dpo and ppo).

Every stage names its models as 'bundled' or an HF checkpoint directory, checks its `data.max_length`
against the model's context before any weights load, and loads frozen models (DPO's and PPO's
reference, PPO's reward model) the same way: fp32, eval mode, no gradients.
"""
from __future__ import annotations

from pathlib import Path

import torch

from serving.models import ensure_bundled_model
from serving.paths import data_dir_from_env
from trainer.config import ConfigError


def resolve_model_path(model: str) -> Path:
    """'bundled' → the dequantised SmolLM2 in the data dir (made once); otherwise a checkpoint directory."""
    if model == "bundled":
        return ensure_bundled_model(data_dir_from_env())
    path = Path(model)
    if not (path / "config.json").exists():
        raise ConfigError(f"model: {path} is not an HF checkpoint directory (no config.json)")
    return path


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (SmolLM2 has a pad token; many base models do not)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_context(model_path: Path, max_length: int) -> None:
    """`data.max_length` must fit the model's context (a ConfigError before anything is trained)."""
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    if context is not None and max_length > context:
        raise ConfigError(f"data.max_length {max_length} exceeds the model's context ({context} tokens)")


def load_frozen(path: Path, device) -> torch.nn.Module:
    """A frozen causal LM (a reference): fp32 weights, eval mode, no gradients (it never changes)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model.requires_grad_(False)


def load_scalar_head(path: Path, pad_id: int, device) -> torch.nn.Module:
    """`path`'s body with a one-output head `score` (a reward or value model), fp32, in eval mode (as HF
    loads it).

    A checkpoint without a `score` head (the SFT model) gets a fresh one from torch's RNG (the stage
    seeds it); `pad_token_id` is set so HF finds each row's last real token.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = pad_id
    return model.to(device)
