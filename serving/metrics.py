"""Prometheus metrics of the gateway, labelled by model version where the weights matter.

Each app builds its own registry so that several servers (tests, workers) can live in one process.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServingMetrics:
    """The metrics the services update. Gauges for queue and batch read the engine when scraped."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_size = Gauge("feedloop_queue_size", "Requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("feedloop_batch_size", "Requests in the running decode batch", registry=r)
        self.time_to_first_token = Histogram(
            "feedloop_time_to_first_token_seconds", "From request arrival to its first token",
            ["model_version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "feedloop_time_per_output_token_seconds", "Mean time between output tokens of a request",
            ["model_version"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r)
        self.request_duration = Histogram(
            "feedloop_request_duration_seconds", "Whole request, arrival to last token",
            ["model_version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Histogram(
            "feedloop_prompt_tokens", "Prompt length in tokens", ["model_version"],
            buckets=_TOKEN_BUCKETS, registry=r)
        self.generated_tokens = Histogram(
            "feedloop_generated_tokens", "Generated tokens per request", ["model_version"],
            buckets=_TOKEN_BUCKETS, registry=r)
        self.requests = Counter(
            "feedloop_requests", "Finished generation requests by outcome",
            ["model_version", "outcome"], registry=r)
        self.scored_pairs = Counter(
            "feedloop_scored_pairs", "(prompt, response) pairs scored", ["model_version"], registry=r)
        self.deployments = DeploymentMetrics(r)

    def request_outcomes(self, model_version: str) -> dict[str, float]:
        """Finished generation requests of one version by outcome (ok, error, cancelled, rejected)."""
        out: dict[str, float] = {}
        for family in self.requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("model_version") == model_version:
                    out[sample.labels["outcome"]] = sample.value
        return out

    def track_engine(self, stats: Callable[[], dict]) -> None:
        """Read queue and batch sizes from the engine at scrape time."""
        self.queue_size.set_function(lambda: stats().get("queue_size", 0))
        self.batch_size.set_function(lambda: stats().get("batch_size", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DeploymentMetrics:
    """What the deployment watcher did: which version serves each role, swaps, refusals, rollbacks."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.serving = Gauge(
            "feedloop_deployed_model", "Percent of new traffic per loaded, routed model version",
            ["role", "model_version", "slot"], registry=r)
        self.revision = Gauge("feedloop_deployment_revision", "Registry revision this gateway applied",
                              ["role"], registry=r)
        self.swaps = Counter("feedloop_model_swaps", "Routing changes applied from the registry", ["role"],
                             registry=r)
        self.load_seconds = Histogram(
            "feedloop_model_load_seconds", "Loading and verifying a model version before it serves", ["role"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.refusals = Counter("feedloop_model_refusals", "Model versions this gateway refused to serve",
                                ["role", "reason"], registry=r)
        self.auto_rollbacks = Counter("feedloop_model_auto_rollbacks",
                                      "Rollbacks this gateway asked for on a high error rate", ["role"], registry=r)
