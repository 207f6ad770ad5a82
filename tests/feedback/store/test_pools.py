"""Upstream pools in the store: fields checked with messages, names unique, removal refused while the
pool's version serves, both written to the audit log. SQLite and Postgres."""
from __future__ import annotations

import pytest

from feedback.store.pools import UnknownPool, UpstreamPools
from feedback.store.registry import ModelRegistry, RegistryError

CHECKSUMS = {"model.safetensors": "ab" * 32}


def test_pools_are_listed_by_role_oldest_first_and_audited(store):
    pools = UpstreamPools(store)
    tgi = pools.add("tgi-v1", role="policy", kind="tgi", url="http://tgi-v1:8080/", discovery="dns",
                    model_version="v1", actor="cli", reason="blue")
    pools.add("reward-b", role="reward", kind="feedloop", url="http://reward-b:8080", actor="admin-api")
    assert tgi.url == "http://tgi-v1:8080" and tgi.discovery == "dns" and tgi.created_at is not None
    assert [p.name for p in pools.list()] == ["tgi-v1", "reward-b"]
    assert [p.name for p in pools.list("policy")] == ["tgi-v1"]
    assert pools.get("reward-b").kind == "feedloop" and pools.get("nope") is None
    events = ModelRegistry(store).history("policy")
    assert [(e.action, e.version, e.actor) for e in events] == [("pool_added", "v1", "cli")]
    assert events[0].reason == "tgi-v1: tgi at http://tgi-v1:8080 (dns discovery); blue"


@pytest.mark.parametrize("fields, message", [
    ({"name": "TGI_v1"}, "DNS label"),
    ({"role": "critic"}, "role must be one of policy, reward"),
    ({"kind": "triton"}, "kind must be one of feedloop, tgi, openai, sglang"),
    ({"url": "tgi:8080"}, "must start with http://"),
    ({"discovery": "mdns"}, "discovery must be one of dns, srv"),
    ({"model_version": None}, "a tgi pool needs model_version"),
    ({"role": "reward"}, "reward pools are feedloop workers"),
])
def test_bad_pools_are_refused_with_what_is_wrong(store, fields, message):
    pool = {"name": "tgi-v1", "role": "policy", "kind": "tgi", "url": "http://tgi:8080", "model_version": "v1",
            **fields}
    with pytest.raises(RegistryError, match=message):
        UpstreamPools(store).add(pool.pop("name"), **pool)
    assert UpstreamPools(store).list() == []


def test_names_are_unique_and_removal_waits_until_the_version_no_longer_serves(store):
    pools, registry = UpstreamPools(store), ModelRegistry(store)
    registry.ensure_deployed("policy", "v1", stage="base", checkpoint_path="/ckpt/v1", checksums=CHECKSUMS)
    store.register_version("v2", stage="ppo", checkpoint_path="/ckpt/v2", checksums=CHECKSUMS)
    pools.add("tgi-v1", role="policy", kind="tgi", url="http://tgi-v1:8080", model_version="v1")
    pools.add("tgi-v2", role="policy", kind="tgi", url="http://tgi-v2:8080", model_version="v2")
    with pytest.raises(RegistryError, match="pool tgi-v1 exists already"):
        pools.add("tgi-v1", role="policy", kind="tgi", url="http://elsewhere:8080", model_version="v1")
    assert pools.get("tgi-v1").url == "http://tgi-v1:8080"

    with pytest.raises(RegistryError, match="tgi-v1 serves v1, the policy's serving version"):
        pools.remove("tgi-v1")
    registry.start_canary("v2", 10)
    with pytest.raises(RegistryError, match="tgi-v2 serves v2, the policy's canary version"):
        pools.remove("tgi-v2")
    registry.promote("v2")
    removed = pools.remove("tgi-v1", actor="cli", reason="drained")
    assert removed.model_version == "v1" and [p.name for p in pools.list()] == ["tgi-v2"]
    with pytest.raises(UnknownPool, match=r"no pool tgi-v1 \(registered: tgi-v2\)"):
        pools.remove("tgi-v1")
    pools.remove("tgi-v2", force=True)  # an operator may still take the serving version's pool away
    assert pools.list() == []
    actions = [(e.action, e.version) for e in registry.history("policy") if e.action.startswith("pool_")]
    assert actions == [("pool_removed", "v2"), ("pool_removed", "v1"), ("pool_added", "v2"), ("pool_added", "v1")]
    assert registry.history("policy")[0].reason.endswith("(forced)")
