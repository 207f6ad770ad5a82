"""/health follows the real engine's life: 503 before it starts and after it stops, 200 between."""
from __future__ import annotations

import httpx

from serving.engine.local import LocalEngineClient
from serving.http.app import create_app
from serving.services import Services
from serving.settings import ServingSettings
from tests.fakes import FakeReward


async def test_health_tracks_the_engine_thread(tiny_policy, tmp_path):
    engine = LocalEngineClient(tiny_policy, max_batch_size=2)
    services = Services.build(ServingSettings(data_dir=tmp_path), engine, FakeReward())
    app = create_app(services)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        before = await client.get("/health")
        assert before.status_code == 503
        assert "not running" in before.json()["error"]
        await services.start()
        try:
            up = await client.get("/health")
            assert up.status_code == 200 and up.json()["model_version"] == engine.model_version
        finally:
            await services.stop()
        assert (await client.get("/health")).status_code == 503
