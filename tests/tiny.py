"""Tiny random-init checkpoints (the bundled tokenizer + a 2-layer Llama) so the suite runs fast.
The builder is bench/tiny.py's (one definition for tests and benchmarks); the tokenizer is read once."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from bench.tiny import make_tiny_checkpoint as _make_tiny_checkpoint
from serving.models import load_bundled_tokenizer


@lru_cache(maxsize=1)
def bundled_tokenizer():
    return load_bundled_tokenizer()


def make_tiny_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny Llama with the bundled tokenizer to `out_dir` (see bench/tiny.py)."""
    return _make_tiny_checkpoint(out_dir, seed, tokenizer=bundled_tokenizer())
