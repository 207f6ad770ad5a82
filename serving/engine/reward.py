"""Reward scoring: a causal-LM body with a one-output head, read at each sequence's last real token.

`reward_scores` is the one definition of "the reward of a sequence"; the trainer's reward stage
uses it too, so training and serving score the same way.

HF's `*ForSequenceClassification` heads have no bias (`score` is Linear(bias=False)) and no config
switch adds one, so the constant the RM stage sets (demonstrations score 0 on average) is kept in
the model config as `feedloop_reward_bias` (config.json) and added here; absent, it is 0.
"""
from __future__ import annotations

import torch


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores of right-padded sequences.

    model: an HF `*ForSequenceClassification` with num_labels=1 (its body under
    `model.base_model_prefix`, its head `model.score`). input_ids, attention_mask: (B, T).
    Returns (B,) float32: the head applied to the hidden state of each row's last real token, plus
    `model.config.feedloop_reward_bias` when set.
    """
    body = getattr(model, model.base_model_prefix)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    last = attention_mask.sum(dim=1) - 1  # (B,) index of the last real token (right padding)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    bias = getattr(model.config, "feedloop_reward_bias", None) or 0.0
    return model.score(pooled).squeeze(-1).float() + bias  # (B,)


def render_pair(tokenizer, prompt: str | list[dict], response: str) -> str:
    """The text the reward model reads: the chat template over (prompt as a user turn, or the
    given messages) followed by the response as the assistant's turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = messages + [{"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)
