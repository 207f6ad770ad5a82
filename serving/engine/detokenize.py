"""Incremental detokenisation: text deltas as tokens arrive, never splitting a multi-byte character.

Decodes a short window of recent ids (as TGI and vLLM do) rather than the whole sequence each step;
a delta is held back while it ends in U+FFFD (an incomplete UTF-8 sequence).
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, special_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.special_ids = special_ids
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append a token; return the new text it completes ('' if held back or special)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of the sequence."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def token_text(self, token_id: int) -> str:
        """The token's own text (special tokens included), as TGI reports in `details.tokens`."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
