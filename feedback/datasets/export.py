"""`export`: one dataset kind from the store into `<kind>.train.jsonl` and `<kind>.heldout.jsonl`,
recorded as a dataset snapshot (content hash, counts). Formats: docs/datasets.md."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from feedback.datasets.sources import SOURCES, comparisons_left_out
from feedback.datasets.split import is_heldout
from feedback.store import FeedbackStore

KINDS = tuple(SOURCES)


@dataclass(frozen=True)
class ExportResult:
    train_path: Path
    heldout_path: Path
    counts: dict[str, int]
    content_hash: str
    snapshot_id: int


def export(store: FeedbackStore, kind: str, out_dir: str | Path, heldout_fraction: float = 0.1, seed: int = 0,
           *, progress: bool = True) -> ExportResult:
    """Stream `kind` records out of the store, split by prompt, and record the snapshot.

    The files appear complete or not at all: they are written under temporary names and renamed.
    """
    if kind not in SOURCES:
        raise ValueError(f"unknown dataset kind {kind!r} (one of {', '.join(KINDS)})")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {split: out_dir / f"{kind}.{split}.jsonl" for split in ("train", "heldout")}
    partial = {split: path.with_name(path.name + ".partial") for split, path in paths.items()}
    counts: Counter[str] = Counter()

    # REPEATABLE READ on Postgres: the kinds built from several queries (rm) see one snapshot of
    # the tables while the ingestor keeps writing.
    connection = store.engine.connect()
    if store.engine.dialect.name == "postgresql":
        connection = connection.execution_options(isolation_level="REPEATABLE READ")
    with connection, open(partial["train"], "w", encoding="utf-8") as train, \
            open(partial["heldout"], "w", encoding="utf-8") as heldout, \
            tqdm(desc=f"export {kind}", unit=" records", file=sys.stderr, disable=not progress) as bar:
        for prompt_key, record in SOURCES[kind](connection, seed):
            split = "heldout" if is_heldout(prompt_key, heldout_fraction, seed) else "train"
            (heldout if split == "heldout" else train).write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[split] += 1
            if "source" in record:
                counts[record["source"]] += 1
            bar.update()
        if kind == "rm":
            counts.update(comparisons_left_out(connection))
    for split in paths:
        os.replace(partial[split], paths[split])

    counts = {"train": counts["train"], "heldout": counts["heldout"], **counts}
    content_hash = files_hash([paths["train"], paths["heldout"]])
    snapshot = store.record_snapshot(kind=kind, content_hash=content_hash, counts=counts, path=str(out_dir.resolve()),
                                     heldout_fraction=heldout_fraction, seed=seed)
    return ExportResult(paths["train"], paths["heldout"], counts, content_hash, snapshot.id)


def files_hash(paths: list[Path]) -> str:
    """sha256 over the files' bytes, one after the other (train, then held-out)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
