"""The records of each dataset kind, streamed from the store as `(prompt_key, record)`.

Every query runs through `stream`, which fetches `BATCH` rows at a time (a server-side cursor on
Postgres), so memory does not grow with the table. The only per-group memory is thumbs: the rated
completions of one prompt at a time.
"""
from __future__ import annotations

import heapq
import random
from itertools import groupby
from typing import Any, Iterator

from sqlalchemy import Connection, Select, func, select

from feedback.store.tables import (NO_PREFERENCE_WINNERS, PREFERENCE_WINNERS, Comparison, Completion, Demonstration,
                                   Ranking, RankingEntry, Rating)

BATCH = 1000
# Thumbs make |up| × |down| pairs per prompt; a prompt rated thousands of times would otherwise
# flood the set with pairs about one prompt.
MAX_RATING_PAIRS_PER_PROMPT = 32

Record = tuple[str, dict[str, Any]]  # (prompt_key, the JSON line)

completions, demonstrations = Completion.__table__, Demonstration.__table__
ratings, comparisons = Rating.__table__, Comparison.__table__
rankings, ranking_entries = Ranking.__table__, RankingEntry.__table__


def stream(connection: Connection, statement: Select) -> Iterator:
    return connection.execution_options(yield_per=BATCH).execute(statement)


def _prompt(text: str | None, chat: list | None) -> str | list[dict]:
    return text if text is not None else chat


def sft(connection: Connection, seed: int) -> Iterator[Record]:
    """{"prompt", "response"}: every demonstration; one on a completion takes that completion's prompt."""
    target = completions.alias("target")
    rows = stream(connection, select(
        demonstrations.c.prompt_key, demonstrations.c.prompt_text, demonstrations.c.prompt_chat,
        target.c.prompt_text.label("target_text"), target.c.prompt_chat.label("target_chat"), demonstrations.c.text,
    ).select_from(demonstrations.outerjoin(target, target.c.completion_id == demonstrations.c.completion_id))
        .order_by(demonstrations.c.id))
    for row in rows:
        prompt = _prompt(row.prompt_text, row.prompt_chat) if row.target_text is None and row.target_chat is None \
            else _prompt(row.target_text, row.target_chat)
        yield row.prompt_key, {"prompt": prompt, "response": row.text}


def ptx(connection: Connection, seed: int) -> Iterator[Record]:
    """{"text"}: the demonstrations' own text, as human-written text for the PPO-ptx term."""
    rows = stream(connection, select(demonstrations.c.prompt_key, demonstrations.c.text).order_by(demonstrations.c.id))
    for row in rows:
        yield row.prompt_key, {"text": row.text}


def prompts(connection: Connection, seed: int) -> Iterator[Record]:
    """{"prompt"}: each distinct prompt once (served ones and the prompts of demonstrations), in
    prompt_key order — both streams come sorted, so duplicates are adjacent after the merge."""
    served = stream(connection, select(completions.c.prompt_key, completions.c.prompt_text, completions.c.prompt_chat)
                    .order_by(completions.c.prompt_key, completions.c.completion_id))
    written = stream(connection, select(demonstrations.c.prompt_key, demonstrations.c.prompt_text,
                                        demonstrations.c.prompt_chat)
                     .where(demonstrations.c.completion_id.is_(None))
                     .order_by(demonstrations.c.prompt_key, demonstrations.c.id))
    for key, rows in groupby(heapq.merge(served, written, key=lambda r: r.prompt_key), key=lambda r: r.prompt_key):
        row = next(rows)
        yield key, {"prompt": _prompt(row.prompt_text, row.prompt_chat)}


def reward_groups(connection: Connection, seed: int) -> Iterator[Record]:
    """{"prompt", "completions": [best, …, worst], "source"}, from every kind of preference."""
    yield from _from_rankings(connection)
    yield from _from_comparisons(connection)
    yield from _from_ratings(connection, seed)
    yield from _from_demonstrations(connection)


def _group(prompt_key: str, prompt, texts: list[str], source: str) -> Record | None:
    """Identical texts carry no preference between them: keep the best-placed copy of each."""
    distinct = list(dict.fromkeys(texts))
    if len(distinct) < 2:
        return None
    return prompt_key, {"prompt": prompt, "completions": distinct, "source": source}


def _emit(record: Record | None) -> Iterator[Record]:
    if record is not None:
        yield record


def _from_rankings(connection: Connection) -> Iterator[Record]:
    rows = stream(connection, select(
        rankings.c.id, rankings.c.prompt_key, completions.c.prompt_text, completions.c.prompt_chat,
        completions.c.response,
    ).select_from(rankings.join(ranking_entries, ranking_entries.c.ranking_id == rankings.c.id)
                  .join(completions, completions.c.completion_id == ranking_entries.c.completion_id))
        .order_by(rankings.c.id, ranking_entries.c.position))
    for _, entries in groupby(rows, key=lambda r: r.id):
        entries = list(entries)  # at most 9
        first = entries[0]
        yield from _emit(_group(first.prompt_key, _prompt(first.prompt_text, first.prompt_chat),
                                [e.response for e in entries], "ranking"))


def _from_comparisons(connection: Connection) -> Iterator[Record]:
    """Winner a / b → [winner, loser]. Ties and both_bad are left out: neither says which answer is
    better (both_bad says both are bad, not how they compare)."""
    a, b = completions.alias("a"), completions.alias("b")
    rows = stream(connection, select(
        comparisons.c.prompt_key, comparisons.c.winner, a.c.prompt_text, a.c.prompt_chat,
        a.c.response.label("response_a"), b.c.response.label("response_b"),
    ).select_from(comparisons.join(a, a.c.completion_id == comparisons.c.completion_a)
                  .join(b, b.c.completion_id == comparisons.c.completion_b))
        .where(comparisons.c.winner.in_(PREFERENCE_WINNERS)).order_by(comparisons.c.id))
    for row in rows:
        texts = [row.response_a, row.response_b] if row.winner == "a" else [row.response_b, row.response_a]
        yield from _emit(_group(row.prompt_key, _prompt(row.prompt_text, row.prompt_chat), texts, "comparison"))


def _from_ratings(connection: Connection, seed: int) -> Iterator[Record]:
    """Thumbs: a completion's ratings are summed (several people may rate it); net up beats net down
    on the same prompt, pair by pair; net zero says nothing."""
    net = func.sum(ratings.c.score).label("net")
    rows = stream(connection, select(
        completions.c.prompt_key, completions.c.completion_id, completions.c.prompt_text, completions.c.prompt_chat,
        completions.c.response, net,
    ).select_from(completions.join(ratings, ratings.c.completion_id == completions.c.completion_id))
        .group_by(completions.c.completion_id).having(func.sum(ratings.c.score) != 0)
        .order_by(completions.c.prompt_key, completions.c.completion_id))
    for key, rated in groupby(rows, key=lambda r: r.prompt_key):
        rated = list(rated)
        ups = [r for r in rated if r.net > 0]
        downs = [r for r in rated if r.net < 0]
        pairs = range(len(ups) * len(downs))
        if len(pairs) > MAX_RATING_PAIRS_PER_PROMPT:
            # Seeded by prompt: the same export gives the same pairs.
            pairs = sorted(random.Random(f"{seed}:{key}").sample(pairs, MAX_RATING_PAIRS_PER_PROMPT))
        for index in pairs:
            up, down = ups[index // len(downs)], downs[index % len(downs)]
            yield from _emit(_group(key, _prompt(up.prompt_text, up.prompt_chat), [up.response, down.response],
                                    "rating"))


def _from_demonstrations(connection: Connection) -> Iterator[Record]:
    """A demonstration written for a completion is the better answer to that completion's prompt:
    [demonstration, completion]."""
    rows = stream(connection, select(
        demonstrations.c.prompt_key, completions.c.prompt_text, completions.c.prompt_chat, demonstrations.c.text,
        completions.c.response,
    ).select_from(demonstrations.join(completions, completions.c.completion_id == demonstrations.c.completion_id))
        .order_by(demonstrations.c.id))
    for row in rows:
        yield from _emit(_group(row.prompt_key, _prompt(row.prompt_text, row.prompt_chat), [row.text, row.response],
                                "demonstration"))


def comparisons_left_out(connection: Connection) -> dict[str, int]:
    """How many comparisons carried no preference (reported in the snapshot's counts)."""
    rows = stream(connection, select(comparisons.c.winner, func.count())
                  .where(comparisons.c.winner.in_(NO_PREFERENCE_WINNERS)).group_by(comparisons.c.winner))
    return {f"comparisons_{winner}": count for winner, count in rows}


SOURCES = {"sft": sft, "rm": reward_groups, "prompts": prompts, "ptx": ptx}

