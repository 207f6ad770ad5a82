"""Checkpoints for the deployment tests: two tiny policies (seeds 0 and 1) that answer differently."""
from __future__ import annotations

import pytest

from tests.tiny import make_tiny_checkpoint


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("deploy") / "base", seed=0)


@pytest.fixture(scope="session")
def candidate_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("deploy") / "candidate", seed=1)
