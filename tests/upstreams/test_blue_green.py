"""Blue/green across upstreams that cannot reload (kind `tgi`): the gateway follows a SQLite registry;
each version's pool is configured in FEEDLOOP_UPSTREAMS. A version without a pool is refused (the
registry rolled back), a canary waits for its pool's health check and then gets its share, a
promotion moves every new request and the old pool finishes the requests it is running.

The upstreams are a small TGI-compatible server (TGI's `POST /` event stream and `GET /health`)
standing in for text-generation-inference, which cannot run here; it says nothing about its version
(as TGI), so answers carry the `model_version` configured for the pool."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from tests.deployment.gateway import wait_for
from tests.upstreams.harness import free_port, run_gateway, serve_app, tgi_server

OPTIONS = {"health_interval": 0.1, "health_timeout": 1, "connect_timeout": 1, "request_timeout": 30}


def test_blue_green_canary_and_promotion_across_tgi_pools(tiny_model_dir, tmp_path):
    green_port = free_port()
    with serve_app(tgi_server("blue")) as blue:
        green = f"http://127.0.0.1:{green_port}"  # not up yet: ops bring it up during the test
        upstreams = {"policy": [{"url": blue, "kind": "tgi", "model_version": "blue"},
                                {"url": green, "kind": "tgi", "model_version": "green"}], "options": OPTIONS}
        database_url = f"sqlite:///{tmp_path / 'registry.db'}"
        from feedback.store import FeedbackStore
        from feedback.store.registry import ModelRegistry

        store = FeedbackStore(database_url)
        store.migrate()
        for version in ("blue", "green", "ghost"):  # TGI serves hub models: nothing for the gateway to check
            store.register_version(version, stage="sft", role="policy", checkpoint_path=f"/models/{version}",
                                   checksums={})
        ModelRegistry(store).promote("blue", actor="ops")
        store.close()
        with run_gateway(tmp_path, upstreams, tiny_model_dir, database_url=database_url, poll_interval=0.05) as gw, \
                httpx.Client(timeout=30) as client:
            def state() -> dict:
                return client.get(f"{gw.url}/v1/admin/deployments").json()["policy"]

            def ask(n: int, tokens: int = 2) -> list[httpx.Response]:
                body = {"inputs": "Hi", "parameters": {"max_new_tokens": tokens}}
                with ThreadPoolExecutor(8) as pool:
                    return list(pool.map(lambda _: client.post(f"{gw.url}/generate", json=body), range(n)))

            s = state()
            assert s["gateway"]["routing"] == {"serving": "blue", "canary": None, "canary_percent": 0.0}
            assert [(u["model_version"], u["slot"]) for u in s["gateway"]["upstreams"]] == \
                [("blue", "serving"), ("green", "unhealthy")]

            # a version no pool serves: refused, the registry rolled back, traffic never routed to nothing
            assert client.post(f"{gw.url}/v1/admin/models/ghost/promote", json={}).status_code == 200
            wait_for(lambda: gw.store.get_version("ghost").status == "rejected", "ghost refused")
            assert "no upstream serves ghost" in state()["gateway"]["refused"]["ghost"]
            assert {r.headers["x-model-version"] for r in ask(6)} == {"blue"}

            # a canary of green while its pool is down: the gateway waits for it
            r = client.post(f"{gw.url}/v1/admin/models/green/canary", json={"percent": 50})
            assert r.status_code == 200, r.text
            wait_for(lambda: "waiting for the upstreams of green" in (state()["gateway"]["pending"] or ""), "pending")
            assert {r.headers["x-model-version"] for r in ask(6)} == {"blue"}
            with serve_app(tgi_server("green"), port=green_port):
                wait_for(lambda: state()["gateway"]["routing"] == {"serving": "blue", "canary": "green",
                                                                    "canary_percent": 50.0}, "canary routed")
                answers = ask(40)
                assert all(r.status_code == 200 for r in answers)
                split = [r.headers["x-model-version"] for r in answers]
                assert 5 <= split.count("green") <= 35, split
                assert all(r.json()["generated_text"].startswith(r.headers["x-model-version"]) for r in answers)

                # promotion while long answers stream: blue gets no new request and finishes its own
                long: list[httpx.Response] = []
                threads = [threading.Thread(target=lambda: long.extend(ask(1, tokens=80))) for _ in range(10)]
                for t in threads:
                    t.start()
                wait_for(lambda: sum(u["outstanding"] for u in state()["gateway"]["upstreams"]) >= 8, "in flight")
                assert client.post(f"{gw.url}/v1/admin/models/green/promote", json={}).status_code == 200
                wait_for(lambda: state()["gateway"]["routing"]["serving"] == "green", "promoted")
                slots = {u["model_version"]: u["slot"] for u in state()["gateway"]["upstreams"]}
                assert slots["green"] == "serving"
                assert slots["blue"] == "draining" or not any(r.headers["x-model-version"] == "blue" for r in long)
                assert {r.headers["x-model-version"] for r in ask(10)} == {"green"}
                for t in threads:
                    t.join(30)
                assert len(long) == 10 and all(r.status_code == 200 for r in long), [r.text for r in long]
                assert any(r.headers["x-model-version"] == "blue" for r in long)  # drained, not cut
                assert all(r.json()["generated_text"] == f"{r.headers['x-model-version']} " * 80 for r in long)
                wait_for(lambda: {u["model_version"]: u["slot"] for u in state()["gateway"]["upstreams"]}["blue"]
                         == "idle", "blue drained")
            assert gw.store.get_version("green").status == "serving"
            assert gw.store.get_version("blue").status == "retired"
