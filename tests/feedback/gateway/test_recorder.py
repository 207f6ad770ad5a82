"""The recorder never makes a request wait for the bus: a slow or broken publisher costs events
(counted), never latency or errors."""
from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry

from serving.engine.types import SamplingParams
from serving.services.recorder import EventRecorder, RecorderMetrics
from tests.fakes import MemoryPublisher
from tests.feedback.gateway.conftest import recording_services


class StuckPublisher(MemoryPublisher):
    """Blocks in publish until released (a disk that stopped answering)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def publish(self, topic, key, value, headers=None) -> None:
        self.entered.set()
        self.release.wait(10)
        super().publish(topic, key, value, headers)


class BrokenPublisher(MemoryPublisher):
    def publish(self, topic, key, value, headers=None) -> None:
        if value == b"bad":
            raise OSError("disk full")
        super().publish(topic, key, value, headers)


def sample(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_a_full_queue_drops_and_counts_instead_of_blocking():
    registry, publisher = CollectorRegistry(), StuckPublisher()
    recorder = EventRecorder(publisher, RecorderMetrics(registry), max_queue=2)
    event = lambda: (b"k", b"v", {})  # noqa: E731
    assert recorder.record("t", event)
    assert publisher.entered.wait(5)  # the thread holds event 1 inside publish
    start = time.perf_counter()
    accepted = [recorder.record("t", event) for _ in range(5)]
    # The publisher is stuck for good: a record() that waited for it would not return at all; the
    # bound only has to be far below "forever", with room for a loaded CI machine.
    assert time.perf_counter() - start < 1.0
    assert accepted == [True, True, False, False, False]
    assert sample(registry, "feedloop_events_dropped_total", topic="t", reason="queue_full") == 3
    assert sample(registry, "feedloop_event_queue_depth") == 2
    publisher.release.set()
    assert recorder.close(timeout=5)
    assert len(publisher.events) == 3
    assert sample(registry, "feedloop_events_published_total", topic="t") == 3


def test_a_failing_publish_is_counted_and_the_recorder_goes_on():
    registry, publisher = CollectorRegistry(), BrokenPublisher()
    recorder = EventRecorder(publisher, RecorderMetrics(registry))
    for value in (b"ok", b"bad", b"ok"):
        recorder.record("t", lambda v=value: (None, v, {}))
    assert recorder.close(timeout=5)
    assert [v for _, _, v, _ in publisher.events] == [b"ok", b"ok"]
    assert sample(registry, "feedloop_events_dropped_total", topic="t", reason="publish_error") == 1


def test_flush_waits_for_the_events_queued_so_far():
    registry, publisher = CollectorRegistry(), StuckPublisher()
    recorder = EventRecorder(publisher, RecorderMetrics(registry))
    for value in (b"a", b"b"):
        recorder.record("t", lambda v=value: (None, v, {}))
    assert publisher.entered.wait(5)
    assert not recorder.flush(timeout=0.2) and len(publisher.events) == 0  # "a" is still inside publish
    publisher.release.set()
    assert recorder.flush(timeout=5) and [v for _, _, v, _ in publisher.events] == [b"a", b"b"]

    def unbuildable():
        raise ValueError("cannot serialise")
    recorder.record("t", unbuildable)  # an event that fails still counts as handled: flush does not hang
    assert recorder.flush(timeout=5)
    assert sample(registry, "feedloop_events_dropped_total", topic="t", reason="publish_error") == 1
    assert recorder.close(timeout=5)


async def test_requests_stay_fast_while_the_publisher_sleeps(tiny_services):
    publisher = MemoryPublisher(delay=2.0)  # two seconds per event: far slower than the answers
    services = recording_services(tiny_services, publisher, recorder_queue_size=1)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    await services.generation.complete("warm up", params)  # its event holds the publisher from here
    start = time.perf_counter()
    for i in range(4):
        await services.generation.complete(f"slow bus {i}", params)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed  # had any request waited for publish, this would be >= 2 s
    registry = services.metrics.registry
    dropped = sample(registry, "feedloop_events_dropped_total", topic="feedloop.completions", reason="queue_full")
    assert dropped >= 3  # one queued behind the sleeping publish, the rest dropped
    assert len(services.completions) == 5  # feedback can still find every answer
    services.recorder.close(timeout=0)  # do not wait for the sleeping publisher (a daemon thread)
