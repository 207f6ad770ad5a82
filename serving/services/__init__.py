"""Service objects, built once at start-up and shared by the HTTP app and the gRPC servicer."""
from __future__ import annotations

from dataclasses import dataclass

from serving.engine.client import EngineClient, RewardClient
from serving.metrics import ServingMetrics
from serving.services.generation import GenerationService
from serving.services.scoring import ScoringService
from serving.settings import ServingSettings


@dataclass
class Services:
    settings: ServingSettings
    engine: EngineClient
    reward: RewardClient
    metrics: ServingMetrics
    generation: GenerationService
    scoring: ScoringService

    @classmethod
    def build(cls, settings: ServingSettings, engine: EngineClient, reward: RewardClient,
              metrics: ServingMetrics | None = None) -> "Services":
        metrics = metrics or ServingMetrics()
        metrics.track_engine(engine.stats)
        return cls(settings, engine, reward, metrics, GenerationService(engine, metrics),
                   ScoringService(reward, metrics, settings.max_score_batch))

    async def start(self) -> None:
        await self.engine.start()
        await self.reward.start()

    async def stop(self) -> None:
        await self.engine.stop()
        await self.reward.stop()
