"""Service objects, built once at start-up and shared by the HTTP app and the gRPC servicer."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from feedback.bus.base import EventPublisher
from serving.engine.client import EngineClient, RewardClient
from serving.metrics import ServingMetrics
from serving.services.comparison import ComparisonService
from serving.services.completion_index import CompletionIndex, CompletionLookup
from serving.services.feedback import FeedbackService
from serving.services.generation import GenerationService
from serving.services.recorder import EventRecorder, RecorderMetrics
from serving.services.scoring import ScoringService
from serving.settings import ServingSettings

if TYPE_CHECKING:  # serving.deployment imports this module
    from serving.deployment import DeploymentWatcher


@dataclass
class Services:
    settings: ServingSettings
    engine: EngineClient
    reward: RewardClient
    metrics: ServingMetrics
    generation: GenerationService
    scoring: ScoringService
    feedback: FeedbackService
    comparison: ComparisonService
    completions: CompletionIndex
    recorder: EventRecorder | None = None
    # Follows the model registry (hot-swap, canary, rollback); None without a store (tests, tools).
    deployments: "DeploymentWatcher | None" = None

    @classmethod
    def build(cls, settings: ServingSettings, engine: EngineClient, reward: RewardClient,
              metrics: ServingMetrics | None = None, *, publisher: EventPublisher | None = None,
              completion_lookup: CompletionLookup | None = None, recorder_queue_size: int = 10_000,
              completion_index_size: int = 100_000) -> "Services":
        """`publisher`: where served completions and feedback go (None: nothing is recorded and
        /v1/feedback answers 503). It is the caller's: `stop()` drains the recorder but leaves the
        publisher open. `completion_lookup`: the store's id → prompt_key lookup, for feedback on
        completions no longer (or never) in this gateway's memory."""
        metrics = metrics or ServingMetrics()
        metrics.track_engine(engine.stats)
        recorder_metrics = RecorderMetrics(metrics.registry)
        recorder = (EventRecorder(publisher, recorder_metrics, recorder_queue_size)
                    if publisher is not None else None)
        index = CompletionIndex(completion_index_size, completion_lookup)
        generation = GenerationService(engine, metrics, recorder, index)
        return cls(settings, engine, reward, metrics, generation,
                   ScoringService(reward, metrics, settings.max_score_batch),
                   FeedbackService(index, publisher, recorder_metrics), ComparisonService(generation),
                   index, recorder)

    async def start(self) -> None:
        await self.engine.start()
        await self.reward.start()

    async def stop(self) -> None:
        await self.engine.stop()
        await self.reward.stop()
        if self.recorder is not None:  # after the engine: the last answers' events are queued by now
            await asyncio.to_thread(self.recorder.close)
