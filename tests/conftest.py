"""Shared fixtures: a tiny random-init policy (bundled tokenizer) served by the real engine."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from serving.engine.local import LocalEngineClient, LocalRewardClient  # noqa: E402
from serving.models import load_policy, load_reward  # noqa: E402
from serving.services import Services  # noqa: E402
from serving.settings import ServingSettings  # noqa: E402
from tests.tiny import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    return load_policy(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def reference_policy(tiny_model_dir):
    """The same checkpoint loaded separately and left as HF made it, for `generate` parity checks
    (the engine switches its own model's attention function)."""
    return load_policy(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_reward(tiny_policy):
    return load_reward(None, tiny_policy, device="cpu")


@pytest.fixture(scope="session")
def tiny_services(tiny_policy, tiny_reward, tmp_path_factory):
    """A Services object on the real engine and reward model (tiny), engine thread running."""
    settings = ServingSettings(data_dir=tmp_path_factory.mktemp("data"), max_batch_size=16, max_queue=64,
                               max_input_tokens=512, max_total_tokens=1024)
    engine = LocalEngineClient(tiny_policy, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                               max_input_tokens=settings.max_input_tokens,
                               max_total_tokens=settings.max_total_tokens)
    services = Services.build(settings, engine, LocalRewardClient(tiny_reward, run_job=engine.engine.run_job))
    engine.engine.start()
    yield services
    engine.engine.stop()
