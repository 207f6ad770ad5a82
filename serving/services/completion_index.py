"""Which completions this gateway served, so that feedback can be checked before it is accepted.

Feedback names completions by id; an id the platform never served is refused (404), and rankings
and comparisons must concern completions of one prompt. Recent completions live here, in a bounded
LRU filled the moment an answer finishes (before its event reaches the bus, so feedback sent right
after the answer always finds it). Older ones, and those served by other replicas, are looked up
through `fallback`: the store's lookup of ingested completions (id → prompt_key).

A completion served by another replica whose event is not yet ingested is found by neither and is
refused with 404; the client retries (the answer says so) and succeeds once the ingestor caught up.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from feedback.prompt_key import prompt_key

# ids → {id: prompt_key} for the ids found; the store provides it (a database query: call off the loop).
CompletionLookup = Callable[[list[str]], dict[str, str]]


@dataclass
class ServedCompletion:
    prompt: str | list[dict]  # as the user sent it: text, or chat messages
    model_version: str
    comparison_id: str = ""
    _key: str | None = field(default=None, repr=False)

    @property
    def prompt_key(self) -> str:
        # Hashed on first use: most completions never get feedback, and the request path stays short.
        if self._key is None:
            self._key = prompt_key(self.prompt)
        return self._key


class CompletionIndex:
    """Thread-safe LRU of completion_id → ServedCompletion, with a fallback for misses."""

    def __init__(self, capacity: int = 100_000, fallback: CompletionLookup | None = None) -> None:
        self.capacity = capacity
        self.fallback = fallback
        self._entries: OrderedDict[str, ServedCompletion] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, completion_id: str, served: ServedCompletion) -> None:
        with self._lock:
            self._entries[completion_id] = served
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, completion_id: str) -> ServedCompletion | None:
        """The entry if it is still in memory (no fallback)."""
        with self._lock:
            served = self._entries.get(completion_id)
            if served is not None:
                self._entries.move_to_end(completion_id)
            return served

    def prompt_keys(self, completion_ids: Iterable[str]) -> dict[str, str]:
        """id → prompt_key for each id found here or through the fallback; missing ids are absent.
        May block on the fallback (a database): call it from a worker thread."""
        found: dict[str, str] = {}
        missing: list[str] = []
        for cid in dict.fromkeys(completion_ids):
            served = self.get(cid)
            if served is not None:
                found[cid] = served.prompt_key
            else:
                missing.append(cid)
        if missing and self.fallback is not None:
            wanted = set(missing)
            found.update({cid: key for cid, key in self.fallback(missing).items() if cid in wanted})
        return found

    def __len__(self) -> int:
        return len(self._entries)
