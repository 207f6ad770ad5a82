"""Deployments: promote, canary, rollback with an audit log; rejected versions are never deployed;
concurrent writers cannot both win (compare-and-set on the row's revision). SQLite and Postgres."""
from __future__ import annotations

import threading

import pytest

from feedback.store.registry import ModelRegistry, RegistryError

CHECKSUMS = {"model.safetensors": "ab" * 32}


@pytest.fixture
def registry(store):
    return ModelRegistry(store)


def register(store, version, stage="ppo", parent=None):
    return store.register_version(version, stage=stage, checkpoint_path=f"/ckpt/{version}", checksums=CHECKSUMS,
                                  parent_version=parent)


def deploy_base(registry, version="base-1"):
    return registry.ensure_deployed("policy", version, stage="base", checkpoint_path=f"/ckpt/{version}",
                                    checksums=CHECKSUMS)


def test_first_gateway_deploys_what_it_loaded_and_later_ones_follow_the_registry(registry, store):
    state = deploy_base(registry)
    assert (state.serving_version, state.canary_version, state.revision) == ("base-1", None, 1)
    assert store.get_version("base-1").status == "serving" and store.get_version("base-1").role == "policy"
    register(store, "ppo-1", parent="base-1")
    registry.promote("ppo-1", actor="loop", reason="gates passed")
    # A gateway restarted with --model base-1 is told to serve the promoted version instead.
    again = deploy_base(registry)
    assert again.serving_version == "ppo-1" and again.revision == 2


def test_promote_retires_the_old_version_and_rollback_returns_to_it(registry, store):
    deploy_base(registry)
    register(store, "ppo-1", parent="base-1")
    register(store, "ppo-2", parent="ppo-1")
    registry.promote("ppo-1", actor="loop", reason="gates passed")
    state = registry.promote("ppo-2", actor="cli")
    assert state.serving_version == "ppo-2" and state.revision == 3
    assert [store.get_version(v).status for v in ("base-1", "ppo-1", "ppo-2")] == ["retired", "retired", "serving"]

    state = registry.rollback("policy", reason="worse answers", actor="cli")
    assert state.serving_version == "ppo-1"
    assert store.get_version("ppo-2").status == "rejected"
    assert store.get_version("ppo-2").metrics["rejected_reasons"] == ["rolled back: worse answers"]
    state = registry.rollback("policy", reason="still worse", actor="cli")
    assert state.serving_version == "base-1" and store.get_version("base-1").status == "serving"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback("policy", reason="again")
    # A rolled-back (rejected) version cannot come back.
    with pytest.raises(RegistryError, match="rejected"):
        registry.promote("ppo-2")
    actions = [(e.action, e.version, e.previous_version) for e in registry.history("policy")]
    assert actions == [("rollback", "base-1", "ppo-1"), ("rollback", "ppo-1", "ppo-2"),
                       ("promote", "ppo-2", "ppo-1"), ("promote", "ppo-1", "base-1"), ("deploy", "base-1", None)]


def test_canary_then_promote_or_rollback(registry, store):
    deploy_base(registry)
    register(store, "ppo-1", parent="base-1")
    register(store, "ppo-2", parent="base-1")
    with pytest.raises(RegistryError, match=r"\(0, 100\]"):
        registry.start_canary("ppo-1", 0)
    state = registry.start_canary("ppo-1", 10, actor="loop")
    assert (state.serving_version, state.canary_version, state.canary_percent) == ("base-1", "ppo-1", 10.0)
    assert store.get_version("ppo-1").status == "canary"
    # A canary of another version replaces the first (which goes back to candidate).
    registry.start_canary("ppo-2", 25)
    assert store.get_version("ppo-1").status == "candidate"
    state = registry.rollback("policy", reason="error rate 9% > 5%", actor="gateway")
    assert (state.serving_version, state.canary_version, state.canary_percent) == ("base-1", None, 0.0)
    assert store.get_version("ppo-2").status == "rejected" and store.get_version("base-1").status == "serving"

    registry.start_canary("ppo-1", 50)
    state = registry.promote("ppo-1")
    assert (state.serving_version, state.canary_version) == ("ppo-1", None)
    assert store.get_version("base-1").status == "retired"
    with pytest.raises(RegistryError, match="already serves"):
        registry.start_canary("ppo-1", 10)


def test_expected_version_makes_repeated_rollbacks_no_ops(registry, store):
    deploy_base(registry)
    register(store, "ppo-1", parent="base-1")
    registry.promote("ppo-1")
    first = registry.rollback("policy", reason="error rate", actor="gateway-a", expected="ppo-1")
    second = registry.rollback("policy", reason="error rate", actor="gateway-b", expected="ppo-1")
    assert first.serving_version == second.serving_version == "base-1" and second.revision == first.revision
    assert store.get_version("base-1").status == "serving"


def test_rejected_and_unknown_versions_are_never_deployed(registry, store):
    deploy_base(registry)
    register(store, "ppo-bad", parent="base-1")
    row = registry.reject("ppo-bad", ["win_rate 0.41 < 0.55", "kl 14.2 > 12"], actor="loop")
    assert row.status == "rejected" and row.metrics["rejected_reasons"] == ["win_rate 0.41 < 0.55", "kl 14.2 > 12"]
    with pytest.raises(RegistryError, match="win_rate 0.41"):
        registry.promote("ppo-bad")
    with pytest.raises(RegistryError, match="rejected"):
        registry.start_canary("ppo-bad", 5)
    with pytest.raises(RegistryError, match="no model version"):
        registry.promote("nope")
    with pytest.raises(RegistryError, match="roll it back"):
        registry.reject("base-1", ["x"])
    assert registry.deployment("policy").serving_version == "base-1"
    with pytest.raises(RegistryError, match="role"):
        registry.deployment("critic")


def test_policy_and_reward_deploy_independently(registry, store):
    deploy_base(registry)
    registry.ensure_deployed("reward", "rm-0", stage="base", checkpoint_path="/ckpt/rm-0", checksums=CHECKSUMS)
    register(store, "rm-1", stage="rm")
    assert store.get_version("rm-1").role == "reward"
    register(store, "rm-2", stage="rm")
    with pytest.raises(RegistryError, match="reward models have no canary"):
        registry.start_canary("rm-2", 10)
    assert registry.deployment("reward").canary_version is None and store.get_version("rm-2").status == "candidate"
    registry.promote("rm-1")
    assert registry.deployment("reward").serving_version == "rm-1"
    assert registry.deployment("policy").serving_version == "base-1"


def test_concurrent_promotions_each_apply_once(registry, store):
    deploy_base(registry)
    versions = [f"ppo-{i}" for i in range(6)]
    for v in versions:
        register(store, v, parent="base-1")
    errors = []

    def promote(v):
        try:
            ModelRegistry(store).promote(v, actor=v)
        except Exception as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    state = registry.deployment("policy")
    # Every promotion was applied on top of the one before it: revisions 2..7, and the events chain.
    assert state.revision == 1 + len(versions)
    promotions = [e for e in reversed(registry.history("policy")) if e.action == "promote"]
    assert len(promotions) == len(versions)
    chain = ["base-1"] + [e.version for e in promotions]
    assert [e.previous_version for e in promotions] == chain[:-1]
    assert state.serving_version == chain[-1]
    assert [v.version for v in store.list_versions(status="serving")] == [chain[-1]]
