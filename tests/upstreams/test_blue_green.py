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


def test_registered_pools_come_and_go_without_restarting_the_gateway(tiny_model_dir, tmp_path, capsys):
    """Blue/green with the pools in the store instead of FEEDLOOP_UPSTREAMS: `feedloop pools add` (and
    the admin route) put a new TGI pool into the running gateway, which checks its health before
    routing to it; promotion moves the traffic; a pool that serves cannot be removed; a canary's pool
    removed by force while it streams finishes its answers, takes no new request, and the registry's
    canary is refused and rolled back. A steady load throughout sees no failed request."""
    from feedback.store import FeedbackStore
    from feedback.store.registry import ModelRegistry
    from serving.cli import main as feedloop

    database_url = f"sqlite:///{tmp_path / 'registry.db'}"
    store = FeedbackStore(database_url)
    store.migrate()
    for version in ("blue", "green", "purple"):
        store.register_version(version, stage="sft", role="policy", checkpoint_path=f"/models/{version}", checksums={})
    ModelRegistry(store).promote("blue", actor="ops")
    store.close()
    with serve_app(tgi_server("blue")) as blue, serve_app(tgi_server("green")) as green, \
            serve_app(tgi_server("purple", delay=0.02)) as purple, \
            run_gateway(tmp_path, {"policy": [{"url": blue, "kind": "tgi", "model_version": "blue"}],
                                   "options": OPTIONS}, tiny_model_dir, database_url=database_url,
                        poll_interval=0.05) as gw, httpx.Client(timeout=30) as client:
        admin = f"{gw.url}/v1/admin"

        def routing() -> dict:
            return client.get(f"{admin}/deployments").json()["policy"]["gateway"]["routing"]

        def pools() -> dict:
            return {p["name"]: p for p in client.get(f"{admin}/pools").json()["data"]}

        def ask(n: int, tokens: int = 2) -> list[httpx.Response]:
            body = {"inputs": "Hi", "parameters": {"max_new_tokens": tokens}}
            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(lambda _: client.post(f"{gw.url}/generate", json=body), range(n)))

        load: list[tuple[int, str]] = []
        stop = threading.Event()

        def steady() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    r = c.post(f"{gw.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
                    load.append((r.status_code, r.headers.get("x-model-version", "")))

        loaders = [threading.Thread(target=steady) for _ in range(3)]
        for t in loaders:
            t.start()
        try:
            # 1. green registered from the shell: it joins once healthy, and takes no traffic until promoted
            assert feedloop(["pools", "add", "green", "--url", green, "--kind", "tgi", "--model-version", "green",
                             "--reason", "blue/green", "--database-url", database_url]) == 0
            wait_for(lambda: [m["healthy"] for m in pools().get("green", {}).get("members") or []] == [True],
                     "green's member healthy")
            assert {r.headers["x-model-version"] for r in ask(8)} == {"blue"}
            # 2. purple over the admin route; bad and duplicate pools refused with the reason
            r = client.post(f"{admin}/pools", json={"name": "purple", "url": purple, "kind": "tgi",
                                                     "model_version": "purple"})
            assert r.status_code == 201 and r.json()["actor"] == "admin-api", r.text
            r = client.post(f"{admin}/pools", json={"name": "purple", "url": purple, "kind": "tgi",
                                                     "model_version": "purple"})
            assert r.status_code == 409 and "exists already" in r.json()["error"]["message"]
            r = client.post(f"{admin}/pools", json={"name": "srv", "url": "http://_http._tcp.tgi:80", "kind": "tgi",
                                                     "model_version": "x", "discovery": "srv"})
            assert r.status_code == 422 and "drop the port" in r.json()["error"]["message"]
            assert client.delete(f"{admin}/pools/nope").status_code == 404
            # 3. promotion: every request after the switch answered by green
            assert client.post(f"{admin}/models/green/promote", json={}).status_code == 200
            wait_for(lambda: routing()["serving"] == "green", "green serves")
            assert {r.headers["x-model-version"] for r in ask(8)} == {"green"}
            r = client.delete(f"{admin}/pools/green")
            assert r.status_code == 409 and "serves green, the policy's serving version" in r.json()["error"]["message"]
            # 4. purple as a 50 % canary, then its pool forced out while it streams long answers
            wait_for(lambda: [m["healthy"] for m in pools()["purple"]["members"]] == [True], "purple healthy")
            assert client.post(f"{admin}/models/purple/canary", json={"percent": 50}).status_code == 200
            wait_for(lambda: routing()["canary"] == "purple", "canary routed")
            long: list[httpx.Response] = []
            # each request draws its version: 16 of them so that some land on purple (all 16 on green:
            # 1 in 65536; with 8, one CI run in ~250 failed here)
            streams = [threading.Thread(target=lambda: long.extend(ask(1, tokens=60))) for _ in range(16)]
            for t in streams:
                t.start()
            wait_for(lambda: any(m["outstanding"] for m in pools()["purple"]["members"]), "purple streaming")
            r = client.delete(f"{admin}/pools/purple", params={"force": "true", "reason": "bad canary"})
            assert r.status_code == 200, r.text
            wait_for(lambda: "purple" not in pools(), "purple unregistered")
            assert {r.headers["x-model-version"] for r in ask(10)} == {"green"}  # nothing new to purple
            for t in streams:
                t.join(30)
            assert len(long) == 16 and all(r.status_code == 200 for r in long), [r.text for r in long]
            on_purple = [r for r in long if r.headers["x-model-version"] == "purple"]
            assert on_purple and all(r.json()["generated_text"] == "purple " * 60 for r in on_purple)  # drained
            wait_for(lambda: gw.store.get_version("purple").status == "rejected", "the canary rolled back")
            wait_for(lambda: purple not in {m.url for m in gw.services.engine.members}, "purple's member gone")
        finally:
            stop.set()
            for t in loaders:
                t.join(30)
        assert load and all(status == 200 for status, _ in load), [s for s in load if s[0] != 200][:3]
        versions = [v for _, v in load]
        assert versions.index("green") > 0 and "blue" not in versions[versions.index("green") + 3 * 3:]
        events = [(e.action, e.version, e.actor) for e in ModelRegistry(gw.store).history("policy")
                  if e.action.startswith("pool_")]
        assert events == [("pool_removed", "purple", "admin-api"), ("pool_added", "purple", "admin-api"),
                          ("pool_added", "green", "cli")]
