"""The key that groups completions of the same prompt: rankings and comparisons must concern one
prompt, held-out splits must not leak a prompt, and the bus keys events by it so that a prompt's
events stay in order. Gateway, ingestor and export all compute it here, so they always agree."""
from __future__ import annotations

import hashlib
import json


def prompt_key(prompt: str | list[dict]) -> str:
    """sha256 (hex) of the canonical JSON of the prompt: the text, or the chat messages as a list of
    {"role", "content"} dicts (other keys are dropped, so equal conversations get equal keys)."""
    if not isinstance(prompt, str):
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    canonical = json.dumps(prompt, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
