"""The scoring service: batches of (prompt or messages, response) → reward-model scores."""
from __future__ import annotations

from serving.engine.client import RewardClient
from serving.engine.types import ScoreResult
from serving.errors import ValidationError
from serving.metrics import ServingMetrics


class ScoringService:
    def __init__(self, reward: RewardClient, metrics: ServingMetrics, max_batch: int = 64) -> None:
        self.reward = reward
        self.metrics = metrics
        self.max_batch = max_batch

    async def score(self, pairs: list[tuple[str | list[dict], str]]) -> ScoreResult:
        if not pairs:
            raise ValidationError("`inputs` must hold at least one (prompt, response) pair")
        if len(pairs) > self.max_batch:
            raise ValidationError(f"`inputs` holds {len(pairs)} pairs; at most {self.max_batch} per call")
        result = await self.reward.score(pairs)
        self.metrics.scored_pairs.labels(result.model_version).inc(len(pairs))
        return result
