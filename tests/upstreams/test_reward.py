"""The reward upstream: a reward worker's app (the tiny reward model) behind RewardUpstreamPool."""
from __future__ import annotations

import httpx
import pytest

from serving.engine.local import LocalRewardClient
from serving.services import Services
from serving.settings import ServingSettings
from serving.upstreams.config import PoolOptions
from serving.upstreams.reward import RewardUpstreamPool
from serving.worker import _NoPolicy, create_worker_app
from tests.upstreams.harness import free_port, serve_app


async def test_reward_pool_scores_through_a_reward_worker(tiny_reward, tmp_path):
    local = LocalRewardClient(tiny_reward)
    services = Services.build(ServingSettings(data_dir=tmp_path), _NoPolicy(), local, completion_index_size=16)
    pairs = [("Hi", "Hello!"), ([{"role": "user", "content": "Hi"}], "Yo")]
    try:
        with serve_app(create_worker_app(services)) as url:
            health = httpx.get(f"{url}/health").json()
            assert health["role"] == "reward" and health["model_version"] == tiny_reward.model_version
            r = httpx.post(f"{url}/generate", json={"inputs": "Hi"})
            assert r.status_code == 404 and "reward role" in r.json()["error"]
            # a refused port first: the call moves to the live worker
            pool = RewardUpstreamPool([f"http://127.0.0.1:{free_port()}", url],
                                      PoolOptions(health_interval=60, breaker_failures=1))
            await pool.start()
            try:
                assert pool.model_version == tiny_reward.model_version and pool.trained is False
                result = await pool.score(pairs)
                result2 = await pool.score(pairs)
            finally:
                await pool.stop()
            direct = await local.score(pairs)
            assert result.scores == pytest.approx(direct.scores, abs=1e-5) and result2.scores == result.scores
            assert result.model_version == tiny_reward.model_version
            dead, live = pool.members
            assert not dead.healthy and live.outcomes["ok"] == 2
    finally:
        await local.stop()
