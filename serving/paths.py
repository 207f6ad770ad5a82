"""Where feedloop keeps its files. No dependencies beyond the standard library, so the engine and
the benchmarks run where only torch and transformers are installed (the GPU machine)."""
from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """Per-user data directory: $XDG_DATA_HOME/feedloop, else ~/.local/share/feedloop."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "feedloop"


def data_dir_from_env() -> Path:
    """FEEDLOOP_DATA_DIR if set, else the per-user default (what ServingSettings resolves too)."""
    value = os.environ.get("FEEDLOOP_DATA_DIR")
    return Path(value) if value else default_data_dir()
