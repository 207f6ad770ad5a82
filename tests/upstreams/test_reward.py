"""The reward upstream: a reward worker's app (the tiny reward model) behind RewardUpstreamPool, and a
reward promotion in the registry reloaded by the worker."""
from __future__ import annotations

import asyncio

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


def test_a_reward_promotion_in_the_registry_reloads_the_reward_worker(tiny_reward, tiny_model_dir, tmp_path):
    """A gateway in upstream mode following a SQLite registry: a reward model promoted through the
    admin route is reloaded by the reward worker (POST /v1/admin/reload) and /v1/score answers with it."""
    from serving.checkpoint import checksums, model_version_of
    from tests.deployment.gateway import make_reward_checkpoint, wait_for
    from tests.upstreams.harness import run_gateway
    from tests.upstreams.test_blue_green import tgi_server

    rm = make_reward_checkpoint(tiny_model_dir, tmp_path / "rm-1", seed=3)
    version = model_version_of(rm)
    local = LocalRewardClient(tiny_reward)
    services = Services.build(ServingSettings(data_dir=tmp_path / "w"), _NoPolicy(), local, completion_index_size=16)
    try:
        with serve_app(create_worker_app(services)) as reward_url, serve_app(tgi_server("p")) as policy_url:
            upstreams = {"policy": [{"url": policy_url, "kind": "tgi", "model_version": "p"}],
                         "reward": [{"url": reward_url}], "options": {"health_interval": 0.1}}
            with run_gateway(tmp_path, upstreams, tiny_model_dir, database_url=f"sqlite:///{tmp_path / 'r.db'}",
                             poll_interval=0.05) as gw, httpx.Client(timeout=30) as client:
                pairs = {"inputs": [{"prompt": "Hi", "response": "Hello!"}]}
                before = client.post(f"{gw.url}/v1/score", json=pairs).json()
                assert before["model_version"] == tiny_reward.model_version  # untrained: not registered
                gw.store.register_version(version, stage="rm", role="reward", checkpoint_path=str(rm),
                                          checksums=checksums(rm))
                r = client.post(f"{gw.url}/v1/admin/models/{version}/promote", json={})
                assert r.status_code == 200, r.text
                wait_for(lambda: client.post(f"{gw.url}/v1/score", json=pairs).json()["model_version"] == version,
                         "the reward worker serves the promoted version")
                assert httpx.get(f"{reward_url}/health").json()["reward_model_version"] == version
                state = client.get(f"{gw.url}/v1/admin/deployments").json()["reward"]
                assert state["registry"]["serving_version"] == version
                assert [(u["url"], u["model_version"], u["slot"]) for u in state["gateway"]["upstreams"]] == \
                    [(reward_url, version, "serving")]
    finally:
        asyncio.run(local.stop())
