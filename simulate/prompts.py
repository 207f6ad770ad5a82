"""Where simulated users' prompts come from, and how a prompt reads to a preference rule.

A prompt is what docs/datasets.md calls one: a string, or a list of chat messages
`[{"role": …, "content": …}, …]`. Users chat, so a string prompt is sent as one user message.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

Prompt = Union[str, list[dict]]

DEFAULT_PROMPTS: tuple[str, ...] = (
    "Tell me about bananas.",
    "What should I eat for breakfast?",
    "Write a short poem about the sea.",
    "Give me a tip for learning a language.",
    "What is a good name for a cat?",
    "Describe your favourite fruit.",
    "How do I make a smoothie?",
    "Say something kind to a friend.",
    "What is the capital of France?",
    "Suggest a weekend activity.",
    "Explain rain to a child.",
    "What goes well with peanut butter?",
)


class PromptsError(ValueError):
    """A prompts file that cannot be used (missing, bad JSON, wrong shape, empty)."""


def as_messages(prompt: Prompt) -> list[dict]:
    """The conversation sent to chat routes and /v1/compare."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: the text parts, in order
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def rule_text(prompt: Prompt) -> str:
    """What a rule sees as the prompt: the text itself, or the conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _check_prompt(prompt, where: str) -> Prompt:
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if (isinstance(prompt, list) and prompt
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt)):
        return prompt
    raise PromptsError(f"{where}: a prompt must be a non-empty string or a list of "
                       '{"role", "content"} messages')


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file of {"prompt": P} lines (`feedloop data export --kind prompts`'s
    format; other keys are ignored, blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PromptsError(f"cannot read prompts file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise PromptsError(f"prompts file {path} is not UTF-8 text") from exc
    prompts: list[Prompt] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptsError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise PromptsError(f'{where}: each line must be an object with a "prompt" key')
        prompts.append(_check_prompt(record["prompt"], where))
    if not prompts:
        raise PromptsError(f"prompts file {path} has no prompts")
    return prompts


def check_prompts(prompts) -> list[Prompt]:
    """A caller's prompt list, validated like a file's."""
    checked = [_check_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]
    if not checked:
        raise PromptsError("no prompts given")
    return checked
