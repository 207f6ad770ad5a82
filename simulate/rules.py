"""Preference rules: what a simulated user likes.

A rule is a scoring callable `rule(prompt, answer) -> float`: higher is preferred, equal scores are a
tie. `prompt` is the text the user typed (for a conversation, its last user message; see
`simulate.prompts.rule_text`). Rules are plain functions so that a test, a demo or a benchmark can
name its own with `--rule module:function`.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable

PreferenceRule = Callable[[str, str], float]


class RuleError(ValueError):
    """`--rule` names nothing usable (bad spec, missing module or attribute, not callable)."""


def count_word(word: str) -> PreferenceRule:
    """A rule preferring answers with more occurrences of `word` (whole words, case-insensitive)."""
    if not word or not word.strip():
        raise RuleError("count_word needs a non-empty word")
    pattern = re.compile(rf"\b{re.escape(word.strip())}\b", re.IGNORECASE)

    def rule(prompt: str, answer: str) -> float:
        return float(len(pattern.findall(answer)))

    rule.__name__ = f"count_word({word!r})"
    return rule


prefers_banana = count_word("banana")
prefers_banana.__name__ = "prefers_banana"


def prefers_shorter(prompt: str, answer: str) -> float:
    """Fewer characters (stripped) is better."""
    return -float(len(answer.strip()))


def prefers_longer(prompt: str, answer: str) -> float:
    """More characters (stripped) is better."""
    return float(len(answer.strip()))


def load_rule(spec: str) -> PreferenceRule:
    """The callable named by "module:function" (e.g. "simulate.rules:prefers_banana")."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RuleError(f"--rule must look like 'module:function' (e.g. simulate.rules:prefers_banana), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuleError(f"--rule {spec}: cannot import module {module_name!r}: {exc}") from exc
    target = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise RuleError(f"--rule {spec}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise RuleError(f"--rule {spec}: {attr!r} is a {type(target).__name__}, not a callable rule(prompt, answer)")
    return target
