"""SGLang upstreams reloaded in place (kind `sglang`): a gateway following a SQLite registry in front
of two SGLang-compatible servers (tests/upstreams/sglang_server.py; the real `openai` client does the
generation). A promotion under load is rolled across both through `/update_weights_from_disk`, one
at a time, with zero failed requests and per-client versions that switch once; a checkpoint whose
files differ from the registry's checksums is refused by the gateway before SGLang sees it; one
SGLang cannot load is refused (400) and rolled back; a restarted server is seen drifted on
/model_info and reloaded; a canary that no SGLang server can split is refused."""
from __future__ import annotations

import os

import httpx

from feedback.store import FeedbackStore
from feedback.store.registry import ModelRegistry
from serving.checkpoint import read_manifest, write_checkpoint
from tests.deployment.gateway import Load, wait_for
from tests.upstreams.harness import run_gateway, serve_app
from tests.upstreams.sglang_server import SGLangState, sglang_server

OPTIONS = {"health_interval": 0.1, "health_timeout": 1, "connect_timeout": 1, "request_timeout": 30}


def checkpoint(root, name: str, config: str = '{"model_type": "llama"}'):
    def files(d):
        (d / "config.json").write_text(config)
        (d / "model.safetensors").write_bytes(os.urandom(4096))

    return write_checkpoint(root / name, files, {"model_version": name, "stage": "ppo"})


def test_promotions_roll_across_sglang_servers_in_place(tiny_model_dir, tmp_path):
    base, v1, bad, broken = (checkpoint(tmp_path, "sg-base"), checkpoint(tmp_path, "sg-v1"),
                             checkpoint(tmp_path, "sg-corrupt"), checkpoint(tmp_path, "sg-broken", config="{not json"))
    data = bytearray((bad / "model.safetensors").read_bytes())  # flipped after registration's checksums
    data[100] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    database_url = f"sqlite:///{tmp_path / 'registry.db'}"
    store = FeedbackStore(database_url)
    store.migrate()
    registry = ModelRegistry(store)
    registry.ensure_deployed("policy", "sg-base", stage="base", checkpoint_path=str(base),
                             checksums=read_manifest(base)["files"], actor="test")
    for ckpt in (v1, bad, broken):
        store.register_version(ckpt.name, stage="ppo", role="policy", checkpoint_path=str(ckpt),
                               checksums=read_manifest(ckpt)["files"])
    states = [SGLangState(str(base), "sg-base"), SGLangState(str(base), "sg-base")]
    try:
        with serve_app(sglang_server(states[0])) as one, serve_app(sglang_server(states[1], legacy=True)) as two:
            upstreams = {"policy": [{"url": one, "kind": "sglang"}, {"url": two, "kind": "sglang"}],
                         "options": OPTIONS}
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}
            with run_gateway(tmp_path, upstreams, tiny_model_dir, database_url=database_url,
                             poll_interval=0.05) as gw, httpx.Client(timeout=30) as client:
                def policy() -> dict:
                    return client.get(f"{gw.url}/v1/admin/deployments").json()["policy"]

                # both report their weight_version on /model_info (one only on the older /get_model_info)
                assert [(u["model_version"], u["slot"]) for u in policy()["gateway"]["upstreams"]] == \
                    [("sg-base", "serving")] * 2
                with Load(gw.url, body=body) as load:
                    wait_for(lambda: load.count("sg-base") >= 4, "traffic on the old version")
                    registry.promote("sg-v1", actor="test")
                    wait_for(lambda: all(any(v == "sg-v1" for _, v, _ in mine) for mine in load.results)
                             and load.count("sg-v1") >= 6, "every client on the new version")
                    assert [[u["weight_version"] for u in s.updates] for s in states] == [["sg-v1"], ["sg-v1"]]
                    assert all(s.updates[0]["abort_all_requests"] is False for s in states)

                    # files that differ from the registry's checksums: refused by the gateway, SGLang never asked
                    registry.promote("sg-corrupt", actor="test")
                    wait_for(lambda: store.get_version("sg-corrupt").status == "rejected", "the corrupt one refused")
                    # a checkpoint SGLang cannot load: its 400 is a refusal, the registry rolls back
                    registry.promote("sg-broken", actor="test")
                    wait_for(lambda: store.get_version("sg-broken").status == "rejected", "the broken one refused")
                    seen = len(load.all())
                    wait_for(lambda: len(load.all()) >= seen + 6, "traffic after the rollbacks")
                results = load.all()
                assert [r for r in results if r[0] != 200] == []
                assert {v for _, v, _ in results} == {"sg-base", "sg-v1"}
                for _, version, text in results:  # each answer came from the weights its version names
                    assert f'"generated_text":"{version} ' in text, (version, text)
                for mine in load.results:  # old answers, then new ones only
                    versions = [v for _, v, _ in mine]
                    assert "sg-base" not in versions[versions.index("sg-v1"):]
                assert all("sg-corrupt" not in [u["weight_version"] for u in s.updates] for s in states)
                assert [u["weight_version"] for u in states[0].updates] == ["sg-v1", "sg-broken"]
                assert states[0].model_path == str(v1) and states[1].model_path == str(v1)
                refused = policy()["gateway"]["refused"]
                assert "model.safetensors" in refused["sg-corrupt"] and "Failed to load" in refused["sg-broken"]

                # a restarted server comes back on its --model-path: seen on /model_info, reloaded
                states[1].model_path, states[1].weight_version = str(base), "sg-base"
                wait_for(lambda: states[1].weight_version == "sg-v1" and len(states[1].updates) == 2,
                         "the drifted server reloaded")
                # a canary cannot be split inside one SGLang server: refused, the registry rolled back
                store.register_version("sg-canary", stage="ppo", role="policy", checkpoint_path=str(base),
                                       checksums=read_manifest(base)["files"])
                registry.start_canary("sg-canary", 10, actor="test")
                wait_for(lambda: "sg-canary" in policy()["gateway"]["refused"], "the canary refused")
                assert "one model each" in policy()["gateway"]["refused"]["sg-canary"]
                assert registry.deployment("policy").canary_version is None
    finally:
        store.close()
