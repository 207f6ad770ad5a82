"""Nothing acknowledged is lost, nothing is stored twice: broker paused under load, ingestor
killed and restarted, database unreachable for a while. Real Tansu, real Postgres."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from sqlalchemy import text

from feedback import topics
from feedback.bus.local_log import LocalLogConsumer, LocalLogPublisher
from feedback.prompt_key import prompt_key
from feedback.store import FeedbackStore
from protos.feedloop.v1 import events_pb2
from serving.services import Services
from tests.feedback.bus.helpers import FAST_CONSUMER, kafka_consumer, kafka_publisher, wait_for
from tests.feedback.ingest.helpers import IngestorThread, chat, rate, wait_until
from tests.feedback.store.fixtures import POSTGRES, empty_tables
from tests.http.server import serve_http
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def pg_store(postgres_store_url):
    store = FeedbackStore(postgres_store_url)
    empty_tables(store)
    yield store
    store.close()


def _event_ids(store, table: str) -> list[str]:
    with store.engine.connect() as connection:
        return [row[0] for row in connection.execute(text(f"SELECT event_id FROM {table}"))]


def _completion(i: int) -> events_pb2.CompletionServed:
    prompt = f"prompt {i % 50}"
    e = events_pb2.CompletionServed(completion_id=f"cmpl-{i}", text=prompt, prompt_key=prompt_key(prompt),
                                    response=f"answer {i}", model_version="v1")
    e.meta.event_id, e.meta.schema_version = f"ev-c-{i}", 1
    e.meta.time.GetCurrentTime()
    return e


def _rating(i: int, completion: int) -> events_pb2.FeedbackEvent:
    e = events_pb2.FeedbackEvent(rating=events_pb2.Rating(completion_id=f"cmpl-{completion}", score=1 - 2 * (i % 2)))
    e.rating.meta.event_id, e.rating.meta.schema_version = f"ev-r-{i}", 1
    e.rating.meta.time.GetCurrentTime()
    return e


def test_broker_paused_under_load_loses_nothing_acknowledged(tiny_services, kafka_broker, pg_store, tmp_path):
    publisher = kafka_publisher(kafka_broker.url, tmp_path)
    services = Services.build(tiny_services.settings, tiny_services.engine, tiny_services.reward, publisher=publisher)
    acked: list[str] = []
    consumer = kafka_consumer(kafka_broker.url, tmp_path, "ingest", [topics.COMPLETIONS, topics.FEEDBACK])
    with serve_http(services) as url, IngestorThread(consumer, pg_store, poll_timeout=0.2) as ingestor:
        completions = [chat(url, f"load {i}") for i in range(3)]
        stop = threading.Event()

        def load():
            i = 0
            while not stop.is_set():
                event_id = str(uuid.uuid4())
                if rate(url, completions[i % 3], 1, event_id).status_code == 202:
                    acked.append(event_id)
                i += 1

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(1.0)
        kafka_broker.pause()  # unreachable, memory kept
        time.sleep(1.5)
        during_pause = len(acked)
        kafka_broker.resume()
        time.sleep(1.0)
        stop.set()
        loader.join()
        assert during_pause > 10  # the API kept acknowledging while the broker was away
        assert wait_until(lambda: len(_event_ids(pg_store, "ratings")) >= len(acked), timeout=60), \
            f"{len(_event_ids(pg_store, 'ratings'))} of {len(acked)} stored; outbox pending {publisher.pending()}"
        time.sleep(0.5)  # anything redelivered late would show up as an extra row
        assert ingestor.stats.dead_lettered == 0
    services.recorder.close()
    publisher.close()
    stored = _event_ids(pg_store, "ratings")
    assert len(stored) == len(acked) and set(stored) == set(acked)
    assert pg_store.counts()["completions"] == 3


def test_broker_killed_and_restarted_under_load_loses_nothing_acknowledged(tiny_services, kafka_broker, pg_store,
                                                                           tmp_path):
    """The issue's outage: the broker dies while feedback flows and comes back later; everything the
    API acknowledged meanwhile waits in the outbox and is stored once.

    Tansu keeps nothing on disk: it is killed only once the ingestor has caught up (what a replicated
    Kafka keeps, Tansu cannot), and it comes back with empty logs whose offsets start at 0 again. A
    consumer that kept its old positions would then skip records below them (no real cluster loses
    its logs), so the ingestor's consumer re-joins the restarted broker, as after a cluster restart.
    """
    publisher = kafka_publisher(kafka_broker.url, tmp_path)
    services = Services.build(tiny_services.settings, tiny_services.engine, tiny_services.reward, publisher=publisher)

    def ingestor():
        consumer = kafka_consumer(kafka_broker.url, tmp_path, "ingest", [topics.COMPLETIONS, topics.FEEDBACK])
        return IngestorThread(consumer, pg_store, poll_timeout=0.2)

    with serve_http(services) as url:
        completions = [chat(url, f"outage {i}") for i in range(2)]
        before = [str(uuid.uuid4()) for _ in range(20)]
        with ingestor():
            assert all(rate(url, completions[i % 2], 1, e).status_code == 202 for i, e in enumerate(before))
            assert wait_until(lambda: len(_event_ids(pg_store, "ratings")) == 20, timeout=60)
        kafka_broker.kill()
        during = [str(uuid.uuid4()) for _ in range(40)]
        assert all(rate(url, completions[i % 2], -1, e).status_code == 202 for i, e in enumerate(during))
        assert publisher.pending() > 0  # held in the outbox, not lost
        kafka_broker.start()  # same port, empty: topics are re-created on reconnect
        with ingestor() as running:
            assert wait_until(lambda: len(_event_ids(pg_store, "ratings")) >= 60, timeout=90), \
                f"{len(_event_ids(pg_store, 'ratings'))} of 60 stored; outbox pending {publisher.pending()}"
            time.sleep(0.5)
            assert running.stats.dead_lettered == 0
    services.recorder.close()
    publisher.close()
    stored = _event_ids(pg_store, "ratings")
    assert sorted(stored) == sorted(before + during)


def _ingest_process(broker_url: str, data_dir, database_url: str, log) -> subprocess.Popen:
    env = {**os.environ, "FEEDLOOP_DATA_DIR": str(data_dir)}
    return subprocess.Popen([sys.executable, "-m", "serving.cli", "ingest", "--kafka", broker_url,
                             "--database-url", database_url, "--group", "ingest-restart",
                             # small batches: many commits, so the kill lands mid-stream however fast
                             # the machine is
                             "--max-records", "25",
                             "--session-timeout-ms", str(FAST_CONSUMER["session_timeout_ms"])],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def test_ingestor_killed_mid_stream_and_restarted_stores_each_event_once(kafka_broker, pg_store, postgres_store_url,
                                                                         tmp_path):
    publisher = kafka_publisher(kafka_broker.url, tmp_path, client_id="producer")
    n_completions, n_ratings = 400, 3000
    for i in range(n_completions):
        event = _completion(i)
        publisher.publish(topics.COMPLETIONS, event.prompt_key.encode(), event.SerializeToString())
    for i in range(n_ratings):
        publisher.publish(topics.FEEDBACK, b"r", _rating(i, i % n_completions).SerializeToString())
    assert publisher.flush(timeout=60)
    publisher.close()

    log = open(tmp_path / "ingest.log", "w")
    first = _ingest_process(kafka_broker.url, tmp_path / "a", postgres_store_url, log)
    try:
        assert wait_for(lambda: pg_store.counts()["ratings"] > 0, timeout=60, interval=0.005), \
            (tmp_path / "ingest.log").read_text()
        first.send_signal(signal.SIGKILL)  # no goodbye: uncommitted batches are redelivered
        first.wait(timeout=10)
        partial = pg_store.counts()["ratings"]
        assert partial < n_ratings, "the ingestor finished before it was killed: the test proved nothing"
        second = _ingest_process(kafka_broker.url, tmp_path / "b", postgres_store_url, log)
        try:
            assert wait_until(lambda: pg_store.counts()["ratings"] == n_ratings, timeout=90), \
                (tmp_path / "ingest.log").read_text()[-3000:]
            time.sleep(1.0)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    counts = pg_store.counts()
    assert counts["completions"] == n_completions and counts["ratings"] == n_ratings
    assert counts["dead_letters"] == 0
    assert len(set(_event_ids(pg_store, "ratings"))) == n_ratings


def test_database_unreachable_for_a_while_then_caught_up(postgres_store_url, pg_store, tmp_path):
    host_port = POSTGRES.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    proxy = TcpProxy(host, int(port))
    proxied_url = postgres_store_url.replace(host_port, f"127.0.0.1:{proxy.port}")
    store = FeedbackStore(proxied_url)
    publisher = LocalLogPublisher(tmp_path)
    consumer = LocalLogConsumer(tmp_path, "ingest", [topics.COMPLETIONS, topics.FEEDBACK])
    try:
        with IngestorThread(consumer, store, poll_timeout=0.1, max_backoff=0.5) as ingestor:
            proxy.block()
            for i in range(50):
                publisher.publish(topics.COMPLETIONS, b"k", _completion(i).SerializeToString())
            assert wait_until(lambda: ingestor.stats.db_retries >= 3, timeout=30)
            assert pg_store.counts()["completions"] == 0
            proxy.unblock()
            assert wait_until(lambda: pg_store.counts()["completions"] == 50, timeout=30)
            assert ingestor.stats.last_error is not None
    finally:
        publisher.close()
        store.close()
        proxy.close()
