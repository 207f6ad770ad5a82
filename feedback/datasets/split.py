"""The held-out split: decided by prompt, so no prompt (and none of its completions, rankings or
demonstrations) is in both the training and the held-out file."""
from __future__ import annotations

import hashlib


def is_heldout(prompt_key: str, heldout_fraction: float, seed: int) -> bool:
    """Deterministic for (prompt_key, seed): the same prompt lands on the same side in every export
    and every dataset kind, so the reward model is never evaluated on prompts the policy trained on."""
    digest = hashlib.sha256(f"{seed}:{prompt_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction
