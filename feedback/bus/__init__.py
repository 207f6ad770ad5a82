"""The event bus: Kafka (kafka-python) in production, a durable local log by default.

Both sides speak bytes (serialised protobuf events from protos/feedloop/v1/events.proto):
  * EventPublisher — the gateway's side; never blocks a request on the broker;
  * EventConsumer  — the ingestor's side; a consumer group with explicit commits.

`feedback.bus.factory.open_publisher` / `open_consumer` pick the implementation by URL.
"""
from feedback.bus.base import EventConsumer, EventPublisher, Record

__all__ = ["EventConsumer", "EventPublisher", "Record"]
