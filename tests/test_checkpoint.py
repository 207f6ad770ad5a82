"""Checkpoint directories: atomic writes, checksums, versions; a corrupt checkpoint is never loaded."""
from __future__ import annotations

import pytest

from serving.checkpoint import model_version_of, read_manifest, verify_checkpoint, write_checkpoint
from serving.models import load_policy


def _files(tmp):
    (tmp / "a.txt").write_text("alpha")
    (tmp / "model.safetensors").write_bytes(b"\x00" * 64)


def test_write_is_atomic_and_records_checksums(tmp_path):
    final = write_checkpoint(tmp_path / "v1", _files, {"model_version": "demo-v1", "stage": "sft"})
    manifest = read_manifest(final)
    assert set(manifest["files"]) == {"a.txt", "model.safetensors"}
    assert model_version_of(final) == "demo-v1"
    assert verify_checkpoint(final) == []
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]  # no temporary directory left behind
    with pytest.raises(FileExistsError):
        write_checkpoint(tmp_path / "v1", _files, {})


def test_failed_write_leaves_nothing(tmp_path):
    def boom(tmp):
        (tmp / "half.bin").write_bytes(b"1")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path / "v2", boom, {})
    assert list(tmp_path.iterdir()) == []


def test_version_without_manifest_follows_the_weights(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"1234")
    v1 = model_version_of(d)
    (d / "model.safetensors").write_bytes(b"5678")
    assert v1.startswith("plain-") and model_version_of(d) != v1


def test_corrupt_checkpoint_is_refused(tmp_path, tiny_model_dir):
    import shutil

    def copy(tmp):
        for p in tiny_model_dir.iterdir():
            shutil.copy(p, tmp / p.name)

    ckpt = write_checkpoint(tmp_path / "tiny-v1", copy, {"model_version": "tiny-v1"})
    assert load_policy(ckpt, device="cpu").model_version == "tiny-v1"
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff\xff\xff")
    assert verify_checkpoint(ckpt) == ["model.safetensors"]
    with pytest.raises(ValueError, match="checksums"):
        load_policy(ckpt, device="cpu")
