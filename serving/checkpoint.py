"""Checkpoint directories: HF format + safetensors + a manifest with checksums, written atomically.

A checkpoint is immutable once its directory has its final name: files are written under a
temporary name in the same parent, the manifest last, then the directory is renamed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "feedloop-checkpoint/1"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file in `directory` except the manifest, by relative path."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[str(p.relative_to(directory))] = sha256_file(p)
    return out


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def weights_fingerprint(directory: Path) -> str:
    """Short hash of the weight files: identifies the weights of a directory with no manifest."""
    h = hashlib.sha256()
    files = sorted(Path(directory).glob("*.safetensors")) or sorted(Path(directory).glob("*.bin"))
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()[:12]


def model_version_of(directory: Path) -> str:
    """The manifest's model_version, else `<dirname>-<weights hash>` (stable for the same weights)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest and manifest.get("model_version"):
        return str(manifest["model_version"])
    return f"{directory.name}-{weights_fingerprint(directory)}"


def verify_checkpoint(directory: Path) -> list[str]:
    """Files whose checksum differs from the manifest (empty list: intact). No manifest: nothing to check."""
    manifest = read_manifest(directory)
    if not manifest:
        return []
    bad = []
    for rel, digest in manifest.get("files", {}).items():
        p = Path(directory) / rel
        if not p.exists() or sha256_file(p) != digest:
            bad.append(rel)
    return bad


def write_checkpoint(final_dir: Path, save_files, manifest) -> Path:
    """Write a checkpoint atomically. `save_files(tmp_dir)` writes the HF files; then the manifest
    (a dict, or a function of the file checksums giving one) is written with the checksums, and
    the directory renamed to `final_dir`."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        raise FileExistsError(f"checkpoint {final_dir} exists; checkpoints are immutable")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".{final_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_files(tmp)
        files = checksums(tmp)
        fields = manifest(files) if callable(manifest) else manifest
        full = {"format": MANIFEST_FORMAT, "created_at": time.time(), **fields, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True))
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir
