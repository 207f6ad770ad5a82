"""The model registry and dataset snapshots."""
from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from feedback.store import VersionConflict

CHECKSUMS = {"model.safetensors": "ab" * 32, "config.json": "cd" * 32}


def test_versions_round_trip(store):
    base = store.register_version("base-1", stage="base", checkpoint_path="/ckpt/base-1", checksums=CHECKSUMS,
                                  status="serving")
    sft = store.register_version("sft-1", stage="sft", checkpoint_path="/ckpt/sft-1", checksums=CHECKSUMS,
                                 parent_version="base-1", metrics={"loss": 1.5})
    assert (sft.status, sft.parent_version, sft.metrics, sft.checksums) == ("candidate", "base-1", {"loss": 1.5},
                                                                            CHECKSUMS)
    assert store.get_version("sft-1") == sft
    assert store.get_version("nope") is None

    promoted = store.set_status("sft-1", "canary", metrics={"win_rate": 0.61})
    assert promoted.status == "canary" and promoted.metrics == {"loss": 1.5, "win_rate": 0.61}
    assert promoted.updated_at >= sft.updated_at
    assert store.get_version("sft-1").metrics == {"loss": 1.5, "win_rate": 0.61}

    assert [v.version for v in store.list_versions()] == ["base-1", "sft-1"]
    assert [v.version for v in store.list_versions(status="serving")] == ["base-1"]
    assert [v.version for v in store.list_versions(stage="sft")] == ["sft-1"]
    assert base.created_at.tzinfo is not None


def test_registration_is_idempotent_and_checkpoints_are_immutable(store):
    first = store.register_version("rm-1", stage="rm", checkpoint_path="/ckpt/rm-1", checksums=CHECKSUMS)
    assert store.register_version("rm-1", stage="rm", checkpoint_path="/ckpt/rm-1", checksums=CHECKSUMS) == first
    with pytest.raises(VersionConflict):
        store.register_version("rm-1", stage="rm", checkpoint_path="/ckpt/rm-1", checksums={"model.safetensors": "0"})
    assert len(store.list_versions()) == 1


def test_statuses_are_checked(store):
    store.register_version("v1", stage="sft", checkpoint_path="/c", checksums={})
    with pytest.raises(ValueError, match="status 'live'"):
        store.set_status("v1", "live")
    with pytest.raises(KeyError):
        store.set_status("v2", "retired")
    with pytest.raises(IntegrityError):  # the database refuses it too
        with store.engine.begin() as connection:
            connection.execute(text("UPDATE model_versions SET status = 'live'"))


def test_snapshots_are_recorded(store):
    first = store.record_snapshot(kind="rm", content_hash="e" * 64, counts={"train": 9, "heldout": 1},
                                  path="/data/rm", heldout_fraction=0.1, seed=7)
    store.record_snapshot(kind="sft", content_hash="f" * 64, counts={}, path="/data/sft", heldout_fraction=0.0, seed=0)
    [only] = store.list_snapshots("rm")
    assert (only.id, only.content_hash, only.counts, only.seed) == (first.id, "e" * 64, {"train": 9, "heldout": 1}, 7)
    assert [s.kind for s in store.list_snapshots()] == ["rm", "sft"]
