"""write_events: one transaction per batch, idempotent on event_id, semantic rejections with reasons."""
from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from feedback.prompt_key import prompt_key
from feedback.store import DeadLetterRecord, FeedbackStore
from feedback.store.tables import RankingEntry
from protos.feedloop.v1 import common_pb2, events_pb2
from tests.feedback.store.fixtures import empty_tables
from tests.feedback.store.events import T0, comparison, demonstration, meta, rating, ranking, served

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def feedback_rows(store) -> dict[str, int]:
    counts = store.counts()
    return {name: counts[name] for name in ("completions", "ratings", "comparisons", "rankings", "ranking_entries",
                                            "demonstrations")}


def test_completion_is_stored_with_every_field(store):
    event = served("c1", CHAT, "Blue.", event_id="e1", model_version="sft-3", prompt_tokens=12, completion_tokens=2,
                   parameters=common_pb2.SamplingParameters(max_new_tokens=20, do_sample=True, temperature=0.5,
                                                            stop=["\n"], seed=2**63),
                   finish_reason=common_pb2.FINISH_REASON_EOS_TOKEN, comparison_id="cmp-9")
    assert store.write_events([event]).inserted == 1
    row = store.get_completion("c1")
    assert (row.event_id, row.prompt_text, row.prompt_chat, row.prompt_key) == ("e1", None, CHAT, prompt_key(CHAT))
    assert (row.response, row.prompt_tokens, row.completion_tokens, row.model_version) == ("Blue.", 12, 2, "sft-3")
    assert row.parameters == {"max_new_tokens": 20, "do_sample": True, "temperature": 0.5, "stop": ["\n"],
                              "seed": 2**63}
    assert (row.finish_reason, row.comparison_id, row.tenant, row.user_id) == ("eos_token", "cmp-9", "acme", "ann")
    assert row.created_at == T0 and row.ingested_at.tzinfo is not None
    assert store.get_completion("nope") is None
    assert store.completion_exists(["c1", "c2"]) == {"c1"}


def test_the_same_event_twice_is_stored_once(store):
    batch = [served("c1", event_id="e1"), rating("c1", 1, event_id="e2"), ranking(["c1", "c2"], event_id="e3"),
             served("c2", response="5", event_id="e4"), comparison("c1", "c2", "a", event_id="e5"),
             demonstration("Four.", completion_id="c2", event_id="e6")]
    first = store.write_events(batch)
    assert (first.inserted, first.duplicates, first.rejected) == (6, 0, [])
    again = store.write_events(batch)  # a redelivered batch (the ingestor crashed before committing offsets)
    assert (again.inserted, again.duplicates, again.rejected) == (0, 6, [])
    within = store.write_events([rating("c1", -1, event_id="e7"), rating("c1", -1, event_id="e7")])
    assert (within.inserted, within.duplicates) == (1, 1)
    assert feedback_rows(store) == {"completions": 2, "ratings": 2, "comparisons": 1, "rankings": 1,
                                    "ranking_entries": 2, "demonstrations": 1}


def test_feedback_may_arrive_in_the_batch_before_its_completion(store):
    result = store.write_events([rating("c1", 1), served("c1")])
    assert (result.inserted, result.rejected) == (2, [])


def test_ranking_entries_keep_the_order_best_first(store):
    store.write_events([served(c, response=c) for c in ("c1", "c2", "c3")] + [ranking(["c3", "c1", "c2"])])
    with store.engine.connect() as connection:
        entries = connection.execute(select(RankingEntry.position, RankingEntry.completion_id)
                                     .order_by(RankingEntry.position)).all()
    assert [tuple(e) for e in entries] == [(0, "c3"), (1, "c1"), (2, "c2")]


OTHER_PROMPT = "Tell a joke."
STORED = [served("c1", event_id="e-c1"), served("c2", response="5"), served("c3", response="four"),
          served("x1", OTHER_PROMPT, "No."), served(f"c{4}", response="IV")] + \
         [served(f"r{i}", "Rank these", str(i)) for i in range(10)]
empty = events_pb2.FeedbackEvent()
no_event_id = rating("c1", 1)
no_event_id.rating.meta.event_id = ""
new_schema = rating("c1", 1)
new_schema.rating.meta.schema_version = 2

REJECTIONS = {
    "rating of an unknown completion": (rating("ghost", 1), "unknown_completion", "ghost"),
    "rating score 0": (rating("c1", 0), "invalid_score", "score 0"),
    "rating score 2": (rating("c1", 2), "invalid_score", "score 2"),
    "comparison with an unknown completion": (comparison("c1", "ghost", "a"), "unknown_completion", "ghost"),
    "comparison of different prompts": (comparison("c1", "x1", "b"), "different_prompts", "2 different prompts"),
    "comparison with itself": (comparison("c1", "c1", "a"), "same_completion", "c1"),
    "comparison without a winner": (comparison("c1", "c2", "unspecified"), "invalid_winner", "winner 0"),
    "ranking with duplicates": (ranking(["c1", "c2", "c1"]), "duplicate_completion_ids", "more than once"),
    "ranking of ten": (ranking([f"r{i}" for i in range(10)]), "ranking_size", "10 completions"),
    "ranking of one": (ranking(["c1"]), "ranking_size", "1 completions"),
    "ranking of different prompts": (ranking(["c1", "c2", "x1"]), "different_prompts", "c1, c2, x1"),
    "ranking with an unknown completion": (ranking(["c1", "ghost"]), "unknown_completion", "ghost"),
    "empty demonstration": (demonstration("", completion_id="c1"), "empty_text", "empty"),
    "blank demonstration": (demonstration(" \n\t", prompt="Hi"), "empty_text", "empty"),
    "demonstration of an unknown completion": (demonstration("Four.", completion_id="ghost"),
                                               "unknown_completion", "ghost"),
    "demonstration without a target": (demonstration("Four."), "missing_field", "target"),
    "feedback event without a kind": (empty, "empty_event", "no rating"),
    "event without an event_id": (no_event_id, "missing_field", "event_id"),
    "unknown schema version": (new_schema, "unsupported_schema_version", "schema_version 2"),
    "completion with a wrong prompt_key": (served("c9", key="0" * 64), "prompt_key_mismatch", "0" * 64),
    "completion without a model version": (served("c9", model_version=""), "missing_field", "model_version"),
    "completion id served twice": (served("c1", event_id="e-other"), "completion_conflict", "e-c1"),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_invalid_event_is_rejected_with_its_reason(store, case):
    event, code, detail = REJECTIONS[case]
    store.write_events(STORED)
    before = store.counts()
    result = store.write_events([event])
    assert (result.inserted, result.duplicates) == (0, 0)
    [(rejected_event, reason)] = result.rejected
    assert rejected_event is event
    assert result.rejected[0].code == code and detail in reason, reason
    assert store.counts() == before


def test_mixed_batch_stores_the_valid_and_rejects_the_invalid(store):
    batch = [served("c1"), served("c2", response="5"), served("bad", key="f" * 64), rating("c1", 1),
             rating("bad", -1),  # about a completion rejected in the same batch
             ranking(["c1", "c2", "c2"]), comparison("c2", "c1", "b"), demonstration("", prompt="Hi"),
             demonstration("Four.", prompt="What is 2+2?")]
    result = store.write_events(batch)
    assert result.inserted == 5
    assert [(r.event, r.code) for r in result.rejected] == [
        (batch[2], "prompt_key_mismatch"), (batch[4], "unknown_completion"), (batch[5], "duplicate_completion_ids"),
        (batch[7], "empty_text")]
    assert feedback_rows(store) == {"completions": 2, "ratings": 1, "comparisons": 1, "rankings": 0,
                                    "ranking_entries": 0, "demonstrations": 1}


BOOM = {  # a real fault inside the transaction: the database refuses the demonstration row
    "sqlite": "CREATE TRIGGER boom BEFORE INSERT ON demonstrations WHEN NEW.text = 'boom' "
              "BEGIN SELECT RAISE(ABORT, 'boom'); END",
    "postgresql": ["CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN IF NEW.text = 'boom' THEN "
                   "RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
                   "CREATE TRIGGER boom BEFORE INSERT ON demonstrations FOR EACH ROW EXECUTE FUNCTION boom()"],
}


def install(store, statements) -> None:
    with store.engine.begin() as connection:
        for statement in [statements] if isinstance(statements, str) else statements:
            connection.execute(text(statement))


def test_a_database_error_mid_batch_leaves_nothing_of_the_batch(store):
    store.write_events([served("c0", "Earlier prompt")])
    install(store, BOOM[store.engine.dialect.name])
    # Completions, ratings, comparisons and rankings are inserted before the demonstration fails.
    batch = [served("c1"), served("c2", response="5"), rating("c1", 1), comparison("c1", "c2", "a"),
             ranking(["c2", "c1"]), demonstration("boom", completion_id="c1")]
    with pytest.raises(DBAPIError, match="boom"):
        store.write_events(batch)
    assert feedback_rows(store) == {"completions": 1, "ratings": 0, "comparisons": 0, "rankings": 0,
                                    "ranking_entries": 0, "demonstrations": 0}
    batch[-1].demonstration.text = "Four."  # the retry of the whole batch then succeeds
    assert store.write_events(batch).inserted == 6


def test_connection_lost_mid_batch_leaves_nothing_and_the_store_recovers(postgres_store_url):
    """Postgres only: the server ends the session mid-transaction (SQLite has no connection to lose)."""
    store = FeedbackStore(postgres_store_url)
    empty_tables(store)
    install(store, ["CREATE FUNCTION hang_up() RETURNS trigger AS $$ BEGIN "
                    "PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END $$ LANGUAGE plpgsql",
                    "CREATE TRIGGER hang_up BEFORE INSERT ON ratings FOR EACH ROW EXECUTE FUNCTION hang_up()"])
    with pytest.raises(DBAPIError):
        store.write_events([served("c1"), rating("c1", 1)])
    install(store, "DROP TRIGGER hang_up ON ratings")
    assert store.counts()["completions"] == 0
    assert store.write_events([served("c1"), rating("c1", 1)]).inserted == 2
    store.close()


def test_dead_letters_are_kept_once_per_bus_position(store):
    letter = DeadLetterRecord(raw=b"\x00\xffraw", reason="unknown_completion: no completion ghost was served",
                              topic="feedloop.feedback", partition=3, offset=2**40, key=b"k", event_id="e1")
    assert store.write_dead_letters([letter]) == 1
    assert store.write_dead_letters([letter]) == 0  # redelivered after a crash
    assert store.write_dead_letter(raw=b"not protobuf", reason="unparseable") == 1  # no bus position: always kept
    [first, second] = store.dead_letters()
    assert (first.raw, first.topic, first.partition, first.offset, first.key, first.event_id) == \
        (b"\x00\xffraw", "feedloop.feedback", 3, 2**40, b"k", "e1")
    assert (second.raw, second.reason, second.topic) == (b"not protobuf", "unparseable", None)


def test_event_time_falls_back_to_the_store_clock(store):
    event = served("c1")
    event.meta.ClearField("time")
    store.write_events([event])
    row = store.get_completion("c1")
    assert row.created_at == row.ingested_at


def test_write_events_refuses_non_events(store):
    with pytest.raises(TypeError):
        store.write_events([meta()])
