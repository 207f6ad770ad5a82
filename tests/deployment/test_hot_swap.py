"""Hot-swap through the real gateway: promotion under load with zero failed requests, a corrupt
candidate that is never served, a canary split rolled back from the CLI, automatic rollbacks of
candidates that really fail (in decoding, and at their first step) without failing a request of the
serving version, and the reward model swapped independently."""
from __future__ import annotations

import shutil

import httpx

from serving.checkpoint import model_version_of
from serving.cli import main as feedloop
from tests.deployment.gateway import (Load, make_reward_checkpoint, make_short_context_checkpoint, run_gateway,
                                      wait_for)


def test_promotion_under_load_swaps_with_zero_failed_requests(tmp_path, base_dir, candidate_dir):
    base, new = model_version_of(base_dir), model_version_of(candidate_dir)
    with run_gateway(tmp_path, base_dir) as gw, httpx.Client(timeout=30) as client:
        state = gw.deployments(client)["policy"]
        assert state["registry"]["serving_version"] == base  # the gateway registered what it loaded
        assert state["gateway"]["routing"] == {"serving": base, "canary": None, "canary_percent": 0.0}
        gw.register(candidate_dir)
        with Load(gw.url) as load:
            wait_for(lambda: load.count(base) >= 4, "traffic on the old version")
            r = client.post(f"{gw.url}/v1/admin/models/{new}/promote", json={"reason": "gates passed"})
            assert r.status_code == 200, r.text
            assert r.json()["deployment"]["serving_version"] == new
            wait_for(lambda: all(any(v == new for _, v, _ in worker) for worker in load.results)
                     and load.count(new) >= 4, "every load worker served by the new version")
        results = load.all()
        assert [r for r in results if r[0] != 200] == []  # zero failed requests across the swap
        for worker in load.results:  # each worker's requests are sequential: old ones, then new ones only
            versions = [v for _, v, _ in worker]
            assert set(versions) <= {base, new}
            first_new = versions.index(new)
            assert base not in versions[first_new:], versions
        assert load.count(base) >= 4 and load.count(new) >= 4
        # the two versions really are different weights: greedy answers differ
        assert {b for _, v, b in results if v == base}.isdisjoint({b for _, v, b in results if v == new})

        state = gw.deployments(client)["policy"]
        assert state["registry"]["serving_version"] == new
        assert state["gateway"]["routing"]["serving"] == new and state["gateway"]["applied_revision"] == 2
        # the old version's lane is unloaded once drained
        wait_for(lambda: list(gw.deployments(client)["policy"]["gateway"]["versions"]) == [new], "old lane dropped")
        assert gw.store.get_version(base).status == "retired" and gw.store.get_version(new).status == "serving"
        metrics = client.get(f"{gw.url}/metrics").text
        assert f'feedloop_deployed_model{{model_version="{new}",role="policy",slot="serving"}} 100.0' in metrics
        assert 'feedloop_model_swaps_total{role="policy"} 2.0' in metrics  # start-up + promotion


def test_corrupt_candidate_is_never_served_and_the_registry_rolls_back(tmp_path, base_dir, candidate_dir):
    corrupt = shutil.copytree(candidate_dir, tmp_path / "corrupt")
    version = model_version_of(corrupt)
    with run_gateway(tmp_path, base_dir) as gw, httpx.Client(timeout=30) as client:
        base = gw.services.engine.model_version
        gw.register(corrupt)  # registered intact, then one byte flipped on disk
        weights = corrupt / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        with Load(gw.url) as load:
            wait_for(lambda: load.count(base) >= 4, "traffic")
            r = client.post(f"{gw.url}/v1/admin/models/{version}/promote", json={})
            assert r.status_code == 200, r.text  # the registry accepts it; the gateway refuses it
            wait_for(lambda: gw.store.get_version(version).status == "rejected", "the registry rolled back")
            seen = len(load.all())
            wait_for(lambda: len(load.all()) >= seen + 4, "traffic after the rollback")
        assert [r for r in load.all() if r[0] != 200] == []
        assert {v for _, v, _ in load.all()} == {base}  # the corrupt version never answered
        state = gw.deployments(client)["policy"]
        assert state["registry"]["serving_version"] == base
        assert version in state["gateway"]["refused"] and "model.safetensors" in state["gateway"]["refused"][version]
        assert version not in state["gateway"]["versions"]
        actions = [(e.action, e.version, e.actor) for e in gw.services.deployments.registry.history("policy")]
        assert actions[:3] == [("rollback", base, "gateway"), ("refused", version, "gateway"),
                               ("promote", version, "admin-api")]
        assert "registry" in gw.services.deployments.registry.history("policy")[1].reason
        metrics = client.get(f"{gw.url}/metrics").text
        assert 'feedloop_model_refusals_total{reason="checksum",role="policy"} 1.0' in metrics


def test_canary_splits_traffic_and_the_cli_rolls_it_back(tmp_path, base_dir, candidate_dir):
    base, new = model_version_of(base_dir), model_version_of(candidate_dir)
    with run_gateway(tmp_path, base_dir) as gw, httpx.Client(timeout=30) as client:
        gw.register(candidate_dir)
        r = client.post(f"{gw.url}/v1/admin/models/{new}/canary", json={"percent": 50})
        assert r.status_code == 200, r.text
        wait_for(lambda: gw.deployments(client)["policy"]["gateway"]["routing"]["canary"] == new, "canary routed")
        with Load(gw.url) as load:
            wait_for(lambda: load.count(base) >= 3 and load.count(new) >= 3, "both versions answering")
        assert [r for r in load.all() if r[0] != 200] == []
        assert gw.deployments(client)["policy"]["gateway"]["routing"]["canary_percent"] == 50.0

        assert feedloop(["models", "rollback", "--role", "policy", "--reason", "canary looks worse",
                         "--database-url", gw.database_url]) == 0
        wait_for(lambda: gw.deployments(client)["policy"]["gateway"]["routing"]["canary"] is None, "canary removed")
        after = [client.post(f"{gw.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
                 for _ in range(12)]
        assert {(r.status_code, r.headers["x-model-version"]) for r in after} == {(200, base)}
        assert gw.store.get_version(new).status == "rejected"


def test_a_failing_candidate_is_rolled_back_automatically(tmp_path, base_dir):
    broken = make_short_context_checkpoint(tmp_path / "short-context")
    version = model_version_of(broken)
    with run_gateway(tmp_path, base_dir, rollback_min_requests=5) as gw, httpx.Client(timeout=30) as client:
        base = gw.services.engine.model_version
        gw.register(broken)
        body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 16}}  # past the 12 positions
        with Load(gw.url, workers=2, body=body) as load:
            wait_for(lambda: load.count(base) >= 4, "traffic")
            r = client.post(f"{gw.url}/v1/admin/models/{version}/promote", json={"reason": "looks fine"})
            assert r.status_code == 200, r.text
            wait_for(lambda: gw.store.get_version(version).status == "rejected", "the automatic rollback")
            wait_for(lambda: gw.deployments(client)["policy"]["gateway"]["routing"]["serving"] == base,
                     "traffic back on the old version")
            seen = len(load.all())
            wait_for(lambda: len(load.all()) >= seen + 6, "traffic after the rollback")
        failed = [(s, v) for s, v, _ in load.all() if s != 200]
        # the candidate really failed requests, and each error answer names it in X-Model-Version
        assert failed and {v for _, v in failed} == {version}
        # the old version's requests in flight at the promotion finished: failures stay in their lane
        assert gw.services.metrics.request_outcomes(base).get("error", 0) == 0
        # each worker's last requests (sent after the rollback) all succeed on the old version
        assert all(s == 200 and v == base for worker in load.results for s, v, _ in worker[-3:])
        reasons = gw.store.get_version(version).metrics["rejected_reasons"]
        assert len(reasons) == 1 and reasons[0].startswith("rolled back: error rate") and "> 5%" in reasons[0]
        last = gw.services.deployments.registry.history("policy")[0]
        assert (last.action, last.version, last.previous_version, last.actor) == ("rollback", base, version, "gateway")
        assert 'feedloop_model_auto_rollbacks_total{role="policy"} 1.0' in client.get(f"{gw.url}/metrics").text


def test_a_canary_failing_at_its_first_step_is_rolled_back_and_the_serving_version_fails_nothing(tmp_path,
                                                                                                  base_dir):
    """The short-context GPT-2 as a 50 % canary with prompts longer than its position table: its
    requests fail in their prefill, before any token. Each is a failed request of the canary (not a
    refusal, not the serving version's), so the watcher rolls the canary back; the serving
    version's requests in the same steps all succeed."""
    broken = make_short_context_checkpoint(tmp_path / "short-context")
    version = model_version_of(broken)
    prompt = "Tell me a long story about a dragon and a knight and a castle, please."  # 17 tokens > 12
    with run_gateway(tmp_path, base_dir, rollback_min_requests=5) as gw, httpx.Client(timeout=30) as client:
        base = gw.services.engine.model_version
        gw.register(broken)
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 6}}
        with Load(gw.url, workers=3, body=body) as load:
            wait_for(lambda: load.count(base) >= 4, "traffic")
            r = client.post(f"{gw.url}/v1/admin/models/{version}/canary", json={"percent": 50, "reason": "try"})
            assert r.status_code == 200, r.text
            wait_for(lambda: gw.store.get_version(version).status == "rejected", "the automatic rollback")
            wait_for(lambda: gw.deployments(client)["policy"]["gateway"]["routing"]["canary"] is None,
                     "the canary withdrawn")
            seen = [len(worker) + 1 for worker in load.results]  # +1: one may be in flight now
            wait_for(lambda: all(len(w) >= n + 3 for w, n in zip(load.results, seen)), "traffic after the rollback")
        failed = [(s, b) for s, _, b in load.all() if s != 200]
        assert len(failed) >= 5 and all(s == 424 and '"generation"' in b for s, b in failed), failed[:3]
        assert version in failed[0][1]  # the error names the version that failed, in the body and the header
        assert {v for s, v, _ in load.all() if s != 200} == {version}
        outcomes = gw.services.metrics.request_outcomes
        assert outcomes(version).get("error", 0) == len(failed)  # counted where the watcher looks
        assert outcomes(version).get("ok", 0) == 0 and outcomes(version).get("rejected", 0) == 0
        assert outcomes(base).get("error", 0) == 0 and outcomes(base).get("rejected", 0) == 0
        assert outcomes(base)["ok"] == len(load.all()) - len(failed)
        # every request sent after the rollback succeeded on the serving version
        assert all(s == 200 and v == base for worker, n in zip(load.results, seen) for s, v, _ in worker[n:])
        reasons = gw.store.get_version(version).metrics["rejected_reasons"]
        assert len(reasons) == 1 and reasons[0].startswith("rolled back: error rate") and "> 5%" in reasons[0]
        last = gw.services.deployments.registry.history("policy")[0]
        assert (last.action, last.actor) == ("rollback", "gateway")
        assert 'feedloop_model_auto_rollbacks_total{role="policy"} 1.0' in client.get(f"{gw.url}/metrics").text


def test_promoting_a_reward_model_changes_the_scores_version(tmp_path, base_dir):
    rm_a = make_reward_checkpoint(base_dir, tmp_path / "rm-a", seed=1)
    rm_b = make_reward_checkpoint(base_dir, tmp_path / "rm-b", seed=2)
    a, b = model_version_of(rm_a), model_version_of(rm_b)
    pair = {"inputs": [{"prompt": "2+2?", "response": "4"}]}
    with run_gateway(tmp_path, base_dir, reward_model=str(rm_a)) as gw, httpx.Client(timeout=30) as client:
        before = client.post(f"{gw.url}/v1/score", json=pair).json()
        assert before["model_version"] == a
        assert feedloop(["models", "register", str(rm_b), "--role", "reward", "--stage", "rm",
                         "--database-url", gw.database_url]) == 0
        policy = gw.services.engine.model_version
        r = client.post(f"{gw.url}/v1/admin/models/{b}/promote", json={"reason": "better held-out accuracy"})
        assert r.status_code == 200, r.text
        after = wait_for(lambda: (s := client.post(f"{gw.url}/v1/score", json=pair).json())["model_version"] == b
                         and s, "the new reward model scoring")
        assert after["scores"] != before["scores"]
        assert gw.services.engine.model_version == policy  # the policy is untouched
        state = gw.deployments(client)
        assert state["reward"]["registry"]["serving_version"] == b
        assert state["reward"]["gateway"]["routing"]["serving"] == b
        assert gw.store.get_version(a).status == "retired"
