"""Reading the dataset files (docs/datasets.md) and turning SFT records into training tensors.

Every record is checked while the files are read, before the first optimizer step: a bad line found
an hour into a run would waste the hour. Errors name the file and line (`DatasetError`). Unknown
keys are ignored, as the format allows fields to be added.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from trainer.config import TOO_LONG_POLICIES

log = logging.getLogger(__name__)
T = TypeVar("T")

IGNORE_INDEX = -100  # label of positions the loss skips (prompt and padding), as in torch's cross_entropy


class DatasetError(ValueError):
    """A dataset file that cannot be trained on; the message starts with `file:line:`."""


class TooLong(DatasetError):
    """A record over the length limit: an error, or dropped where `too_long: skip` says so."""


class Records(list):
    """The tokenised records of one file; `skipped` counts those dropped as too long."""

    skipped: int = 0


def tokenize_records(path: str | Path, kind: str, encode: Callable[[dict, str], T], too_long: str = "error"
                     ) -> Records:
    """`encode(record, where)` over a file's validated records. A record `encode` finds over the
    length limit (`TooLong`) stops the read (`too_long: error`) or is dropped and counted
    (`skip`: feedback from the public API can be longer than a recipe's max_length, and one such
    record must not fail every run of the loop). Truncating instead would cut the part of an answer
    that made people prefer it. A file of nothing but too-long records is still an error."""
    if too_long not in TOO_LONG_POLICIES:
        raise ValueError(f"too_long must be one of {TOO_LONG_POLICIES}, got {too_long!r}")
    out, first = Records(), None
    for n, record in read_records(path, kind):
        try:
            out.append(encode(record, f"{path}:{n}"))
        except TooLong as exc:
            if too_long == "error":
                raise
            out.skipped += 1
            first = first or str(exc)
    if out.skipped:
        if not out:
            raise DatasetError(f"{path}: all {out.skipped} records exceed the length limit (first: {first})")
        log.warning("records over the length limit skipped", extra={
            "fl_file": str(path), "fl_skipped": out.skipped, "fl_kept": len(out), "fl_first": first})
    return out


def _check_prompt(prompt, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt:
            raise DatasetError(f"{where}: 'prompt' is empty")
        return
    if isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DatasetError(f"{where}: prompt message {i} must be {{'role': str, 'content': str}}, got {m!r}")
        return
    raise DatasetError(f"{where}: 'prompt' must be a non-empty string or list of chat messages, got {prompt!r}")


def _check_text(record: dict, key: str, where: str) -> None:
    if key not in record:
        raise DatasetError(f"{where}: missing field {key!r}")
    if not isinstance(record[key], str) or not record[key]:
        raise DatasetError(f"{where}: {key!r} must be a non-empty string")


def _check_sft(record: dict, where: str) -> None:
    if "prompt" not in record:
        raise DatasetError(f"{where}: missing field 'prompt'")
    _check_prompt(record["prompt"], where)
    _check_text(record, "response", where)


def _check_rm(record: dict, where: str) -> None:
    if "prompt" not in record:
        raise DatasetError(f"{where}: missing field 'prompt'")
    _check_prompt(record["prompt"], where)
    completions = record.get("completions")
    if not isinstance(completions, list):
        raise DatasetError(f"{where}: missing field 'completions' (a list, best first)")
    if len(completions) < 2:
        raise DatasetError(f"{where}: a ranking needs at least 2 completions, got {len(completions)}")
    if not all(isinstance(c, str) for c in completions):
        raise DatasetError(f"{where}: 'completions' must all be strings")


def _check_prompts(record: dict, where: str) -> None:
    if "prompt" not in record:
        raise DatasetError(f"{where}: missing field 'prompt'")
    _check_prompt(record["prompt"], where)


def _check_ptx(record: dict, where: str) -> None:
    _check_text(record, "text", where)


CHECKS = {"sft": _check_sft, "rm": _check_rm, "prompts": _check_prompts, "ptx": _check_ptx}


def read_records(path: str | Path, kind: str) -> Iterator[tuple[int, dict]]:
    """Stream the validated records of a JSONL dataset file as (line number, record).

    Raises DatasetError for a missing or empty file, a line that is not a JSON object, or a record
    that does not match `kind` ('sft', 'rm', 'prompts', 'ptx'). Blank lines are skipped.
    """
    path = Path(path)
    check = CHECKS[kind]
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    count = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
            check(record, where)
            count += 1
            yield line_no, record
    if count == 0:
        raise DatasetError(f"{path}: empty dataset file (no records)")


def skipped_metrics(**loaded) -> dict[str, int]:
    """`skipped_too_long_<name>` for each loaded file that dropped records (a stage's manifest metrics)."""
    return {f"skipped_too_long_{name}": r.skipped for name, r in loaded.items() if getattr(r, "skipped", 0)}


def chat_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string becomes one user turn, a message list is used as given."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@dataclass
class SFTExample:
    input_ids: list[int]  # (T,) chat-formatted prompt + response
    labels: list[int]  # (T,) = input_ids on response tokens, IGNORE_INDEX on prompt tokens


def tokenize_sft(record: dict, tokenizer, max_length: int, where: str = "") -> SFTExample:
    """Apply the chat template (prompt turns + the response as the assistant turn) and mask the prompt.

    The prompt's tokens are those of the template with a generation prompt (`<|im_start|>assistant\\n`),
    so the model learns only what follows the header, exactly what it is asked to produce when served.
    """
    messages = chat_messages(record["prompt"])
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    full_ids = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": record["response"]}],
                                             tokenize=True)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        # Some templates rewrite earlier turns when a reply is added; masking by length would then be wrong.
        raise DatasetError(f"{where}: the chat template does not render the prompt as a prefix of the conversation")
    if len(full_ids) > max_length:
        raise TooLong(f"{where}: {len(full_ids)} tokens (prompt {len(prompt_ids)} + response "
                      f"{len(full_ids) - len(prompt_ids)}) exceed data.max_length {max_length}")
    if len(full_ids) == len(prompt_ids):
        raise DatasetError(f"{where}: the response adds no tokens")
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return SFTExample(list(full_ids), labels)


def load_sft(path: str | Path, tokenizer, max_length: int, too_long: str = "error") -> Records:
    """Read, validate and tokenise a whole SFT file (demonstration sets fit in memory as token ids)."""
    return tokenize_records(path, "sft", lambda r, where: tokenize_sft(r, tokenizer, max_length, where), too_long)


def collate_sft(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch.

    Returns:
        input_ids (B, T) int64 padded with `pad_id`; attention_mask (B, T) int64, 1 on real tokens;
        labels (B, T) int64, IGNORE_INDEX on prompt and padding.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Record order for one epoch: a function of (seed, epoch) only, so a resumed run finds the same
    order without replaying any RNG."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
    """The epoch's micro-batches as lists of record indices (the last one may be smaller)."""
    order = epoch_order(n, seed, epoch, shuffle)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
