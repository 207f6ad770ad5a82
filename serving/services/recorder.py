"""Hands events to the bus off the request path.

`EventPublisher.publish` returns once an event is durable locally (an fsync'd log or outbox), which
can take milliseconds and, on a sick disk, much longer. A served answer must never wait for that, nor
fail because of it, so the generation service only puts a small callable on a bounded in-memory
queue; one background thread builds and serialises the event and publishes it.

When the queue is full (the disk cannot keep up), the event is dropped, counted and logged rather
than blocking the request: serving the user comes before recording the answer. The queue is sized
so that this only happens when publishing is broken, not under ordinary bursts.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from feedback.bus.base import EventPublisher

log = logging.getLogger(__name__)

# What the queue holds: the topic, and a callable that returns (key, value, headers). Building the
# protobuf and hashing the prompt happen on the recorder's thread, not the request's.
EventFactory = Callable[[], tuple[bytes | None, bytes, dict[str, bytes]]]

_STOP = object()


class RecorderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter("feedloop_events_published", "Events made durable on the bus, by topic",
                                 ["topic"], registry=registry)
        self.dropped = Counter("feedloop_events_dropped",
                               "Events not recorded: queue_full (publishing too slow) or publish_error",
                               ["topic", "reason"], registry=registry)
        self.queue_depth = Gauge("feedloop_event_queue_depth", "Events waiting for the recorder thread",
                                 registry=registry)


class EventRecorder:
    """A bounded queue and one thread calling `publisher.publish`. Thread-safe; never blocks `record`."""

    def __init__(self, publisher: EventPublisher, metrics: RecorderMetrics, max_queue: int = 10_000) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        metrics.queue_depth.set_function(self._queue.qsize)
        self._dropped_since_log = 0
        self._thread = threading.Thread(target=self._run, name="feedloop-recorder", daemon=True)
        self._thread.start()

    def record(self, topic: str, make: EventFactory) -> bool:
        """Queue an event; False (and counted as dropped) if the queue is full."""
        try:
            self._queue.put_nowait((topic, make))
            return True
        except queue.Full:
            self.metrics.dropped.labels(topic, "queue_full").inc()
            # One line per burst, not per event: a stuck disk would otherwise flood the log too.
            if self._dropped_since_log == 0:
                log.error("event recorder queue full: dropping events", extra={"fl_topic": topic})
            self._dropped_since_log += 1
            return False

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event queued so far has been published (or dropped); True if it was
        within `timeout` seconds. For a graceful step that must not race the recorder thread."""
        done = self._queue.all_tasks_done
        with done:
            return done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout)

    def close(self, timeout: float = 10.0) -> bool:
        """Publish what is queued (up to `timeout` seconds), then stop the thread. True if drained.
        The publisher itself belongs to whoever built it (it may be shared), so it stays open."""
        if not self._thread.is_alive():
            return True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._queue.task_done()
                return
            try:
                self._publish(*item)
            finally:
                self._queue.task_done()  # what flush() waits on

    def _publish(self, topic: str, make: EventFactory) -> None:
        try:
            key, value, headers = make()
            self.publisher.publish(topic, key, value, headers)
        except Exception:
            self.metrics.dropped.labels(topic, "publish_error").inc()
            log.exception("could not record an event", extra={"fl_topic": topic})
            return
        self.metrics.published.labels(topic).inc()
        if self._dropped_since_log:
            log.warning("event recorder caught up", extra={"fl_dropped": self._dropped_since_log})
            self._dropped_since_log = 0
