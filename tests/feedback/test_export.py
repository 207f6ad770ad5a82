"""Dataset export: exact JSONL per kind, the held-out split by prompt, the recorded hash, streaming."""
from __future__ import annotations

import argparse
import hashlib
import json
import tracemalloc

import psycopg
import pytest
from sqlalchemy import event

from feedback.datasets import export
from feedback.datasets.cli import add_data_commands
from feedback.prompt_key import prompt_key
from feedback.store import FeedbackStore
from tests.feedback.store.events import comparison, demonstration, rating, ranking, served
from tests.feedback.store.fixtures import postgres_store_url, store  # noqa: F401

P1, P3, P4 = "What is 2+2?", "Tell a joke.", "Tell a joke, please."
P2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]

SCENARIO = [
    served("a1", P1, "4"), served("a2", P1, "5"), served("a3", P1, "four"), served("a4", P1, "4"),
    served("b1", P2, "Blue."), served("b2", P2, "Red."), served("j1", P3, "No."),
    ranking(["a3", "a1", "a2"]),
    ranking(["a1", "a4"]),  # the same text twice: no preference, left out
    comparison("b1", "b2", "b"), comparison("a1", "a2", "a"),
    comparison("b1", "b2", "tie"), comparison("a1", "a2", "both_bad"),  # no preference signal: left out
    rating("a1", 1, user="ann"), rating("a1", 1, user="bob"), rating("a2", -1),
    rating("a3", 1), rating("a3", -1),  # net zero: says nothing
    rating("j1", 1),  # nothing rated down on that prompt: no pair
    rating("b1", -1), rating("b2", 1),
    demonstration("Four, of course.", completion_id="a2"), demonstration("Green.", prompt=P2),
    demonstration("Knock knock.", prompt=P4),
]


def lines(path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def scenario(store):
    assert store.write_events(SCENARIO).rejected == []
    return store


def test_sft_pairs_from_demonstrations(scenario, tmp_path):
    result = export(scenario, "sft", tmp_path, heldout_fraction=0.0, progress=False)
    assert lines(result.train_path) == [{"prompt": P1, "response": "Four, of course."},
                                        {"prompt": P2, "response": "Green."},
                                        {"prompt": P4, "response": "Knock knock."}]
    assert lines(result.heldout_path) == []
    assert result.counts == {"train": 3, "heldout": 0}


def test_ptx_text_from_demonstrations(scenario, tmp_path):
    result = export(scenario, "ptx", tmp_path, heldout_fraction=0.0, progress=False)
    assert lines(result.train_path) == [{"text": "Four, of course."}, {"text": "Green."}, {"text": "Knock knock."}]


def test_prompts_each_distinct_prompt_once(scenario, tmp_path):
    result = export(scenario, "prompts", tmp_path, heldout_fraction=0.0, progress=False)
    expected = sorted([P1, P2, P3, P4], key=prompt_key)
    assert lines(result.train_path) == [{"prompt": p} for p in expected]


def test_reward_groups_from_every_kind_of_preference(scenario, tmp_path):
    result = export(scenario, "rm", tmp_path, heldout_fraction=0.0, progress=False)
    thumbs = sorted([(P1, ["4", "5"]), (P2, ["Red.", "Blue."])], key=lambda pair: prompt_key(pair[0]))
    assert lines(result.train_path) == [
        {"prompt": P1, "completions": ["four", "4", "5"], "source": "ranking"},
        {"prompt": P2, "completions": ["Red.", "Blue."], "source": "comparison"},
        {"prompt": P1, "completions": ["4", "5"], "source": "comparison"},
        *({"prompt": p, "completions": c, "source": "rating"} for p, c in thumbs),
        {"prompt": P1, "completions": ["Four, of course.", "5"], "source": "demonstration"},
    ]
    assert result.counts == {"train": 6, "heldout": 0, "ranking": 1, "comparison": 2, "rating": 2,
                             "demonstration": 1, "comparisons_tie": 1, "comparisons_both_bad": 1}


def test_content_hash_is_recorded_as_a_snapshot(scenario, tmp_path):
    result = export(scenario, "rm", tmp_path / "rm", heldout_fraction=0.5, seed=3, progress=False)
    expected = hashlib.sha256(result.train_path.read_bytes() + result.heldout_path.read_bytes()).hexdigest()
    [snapshot] = scenario.list_snapshots("rm")
    assert result.content_hash == snapshot.content_hash == expected
    assert (snapshot.id, snapshot.counts, snapshot.seed, snapshot.heldout_fraction) == \
        (result.snapshot_id, result.counts, 3, 0.5)
    assert snapshot.path == str((tmp_path / "rm").resolve())
    assert not list((tmp_path / "rm").glob("*.partial"))


def test_heldout_split_is_by_prompt_and_deterministic(store, tmp_path):
    events = []
    for i in range(150):
        prompt = f"prompt {i}"
        events += [served(f"c{i}a", prompt, "good"), served(f"c{i}b", prompt, "bad"),
                   ranking([f"c{i}a", f"c{i}b"]), rating(f"c{i}a", 1), rating(f"c{i}b", -1),
                   demonstration("better", completion_id=f"c{i}b")]
    store.write_events(events)

    def prompts_of(result) -> tuple[set, set]:
        return ({r["prompt"] for r in lines(result.train_path)}, {r["prompt"] for r in lines(result.heldout_path)})

    rm = export(store, "rm", tmp_path / "rm", heldout_fraction=0.3, seed=1, progress=False)
    train, heldout = prompts_of(rm)
    assert not train & heldout and len(train | heldout) == 150
    assert 20 < len(heldout) < 70
    assert rm.counts["heldout"] == 3 * len(heldout)  # a prompt's groups all land on its side
    sft = export(store, "sft", tmp_path / "sft", heldout_fraction=0.3, seed=1, progress=False)
    assert prompts_of(sft) == (train, heldout)  # the same prompts held out in every kind
    again = export(store, "rm", tmp_path / "again", heldout_fraction=0.3, seed=1, progress=False)
    assert again.content_hash == rm.content_hash
    other_seed = export(store, "rm", tmp_path / "seed2", heldout_fraction=0.3, seed=2, progress=False)
    assert prompts_of(other_seed)[1] != heldout


def test_export_streams_rows_in_batches(store, tmp_path):
    """20k events: every query of the export runs with yield_per (a server-side cursor on Postgres),
    and the memory the export allocates stays far below what holding the rows would take."""
    batch = []
    for i in range(5000):
        batch += [served(f"c{i}a", f"prompt {i}", "good " * 100), served(f"c{i}b", f"prompt {i}", "bad " * 100),
                  rating(f"c{i}a", 1), rating(f"c{i}b", -1)]
        if len(batch) >= 4000:
            store.write_events(batch)
            batch = []
    assert store.counts()["ratings"] == 10000

    queries = []

    def record(connection, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and "count(*)" not in statement.lower()[:40]:
            queries.append((context.execution_options.get("yield_per"), type(cursor)))

    event.listen(store.engine, "before_cursor_execute", record)
    tracemalloc.start()
    result = export(store, "rm", tmp_path, heldout_fraction=0.1, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    event.remove(store.engine, "before_cursor_execute", record)

    assert result.counts["rating"] == 5000
    assert queries and all(yield_per == 1000 for yield_per, _ in queries), queries
    if store.engine.dialect.name == "postgresql":
        assert all(issubclass(cursor, psycopg.ServerCursor) for _, cursor in queries)
    # Measured: ~2.7 MB streamed (fixed overhead); holding the 10k rated completions (~500-character
    # answers) at once took over 8 MB.
    assert peak < 4_000_000, peak


def test_cli_exports_through_argparse(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'feedloop.db'}"
    store = FeedbackStore(url)
    store.migrate()
    store.write_events(SCENARIO)
    store.close()
    parser = argparse.ArgumentParser(prog="feedloop")
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "export", "--kind", "sft", "--out", str(tmp_path / "out"),
                              "--database-url", url, "--heldout-fraction", "0", "--seed", "5"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"] == {"train": 3, "heldout": 0}
    assert (tmp_path / "out" / "sft.train.jsonl").exists()


def test_bad_arguments_are_refused(store, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset kind"):
        export(store, "dpo", tmp_path)
    with pytest.raises(ValueError, match="heldout_fraction"):
        export(store, "sft", tmp_path, heldout_fraction=1.0)
