"""A real gateway for the deployment tests: `build_services` on a tiny checkpoint, a SQLite store,
the deployment watcher and uvicorn in one event loop on a background thread — as `feedloop serve`
runs them (serving/server.py `serve`), on 127.0.0.1 and a free port."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
import uvicorn
from transformers import AutoModelForSequenceClassification, GenerationConfig, GPT2Config, GPT2LMHeadModel

from feedback.store import FeedbackStore
from serving.checkpoint import checksums, model_version_of
from serving.http.app import create_app
from serving.server import build_services, start_deployments
from serving.services import Services
from serving.settings import ServingSettings
from tests.tiny import bundled_tokenizer

PROMPT = {"inputs": "Hello there", "parameters": {"max_new_tokens": 4}}


@dataclass
class Gateway:
    url: str
    services: Services
    store: FeedbackStore
    database_url: str

    def register(self, path: Path, *, role: str = "policy", stage: str = "ppo", sums: dict | None = None) -> str:
        version = model_version_of(path)
        self.store.register_version(version, stage=stage, role=role, checkpoint_path=str(path),
                                    checksums=sums if sums is not None else checksums(path))
        return version

    def deployments(self, client: httpx.Client) -> dict:
        r = client.get(f"{self.url}/v1/admin/deployments", headers=self.auth)
        assert r.status_code == 200, r.text
        return r.json()

    @property
    def auth(self) -> dict:
        token = self.services.settings.admin_token
        return {"Authorization": f"Bearer {token}"} if token else {}


@contextmanager
def run_gateway(tmp: Path, model: Path, **settings) -> Iterator[Gateway]:
    database_url = f"sqlite:///{tmp / 'feedloop.db'}"
    settings = ServingSettings(data_dir=tmp / "data", model=str(model), database_url=database_url, grpc_port=None,
                               device="cpu", max_batch_size=8, max_queue=256, max_input_tokens=256,
                               max_total_tokens=512, poll_interval=0.05, **settings)
    store = FeedbackStore(database_url)
    store.migrate()
    services = build_services(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(services), log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=2))
    failure: list[BaseException] = []

    async def main() -> None:
        await services.start()
        try:
            await start_deployments(services, store)
            await server.serve(sockets=[sock])
        finally:
            if services.deployments is not None:
                await services.deployments.stop()
            await services.stop()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"the gateway did not start: {failure}"
        time.sleep(0.01)
    try:
        yield Gateway(f"http://127.0.0.1:{port}", services, store, database_url)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        store.close()
    assert not thread.is_alive(), "the gateway did not stop"
    assert not failure, failure


def wait_for(predicate, what: str, timeout: float = 30.0, interval: float = 0.02):
    """Poll until `predicate()` is truthy (returns it); a generous bound that only catches hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Load:
    """Steady traffic: `workers` threads each sending requests one after the other until stopped.
    Each worker keeps its results in order: (status, X-Model-Version, body)."""

    url: str
    workers: int = 3
    body: dict = field(default_factory=lambda: dict(PROMPT))
    results: list[list[tuple[int, str, str]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> "Load":
        for i in range(self.workers):
            mine: list[tuple[int, str, str]] = []
            self.results.append(mine)
            t = threading.Thread(target=self._work, args=(mine,), name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _work(self, out: list) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(f"{self.url}/generate", json=self.body)
                    out.append((r.status_code, r.headers.get("x-model-version", ""), r.text))
                except httpx.HTTPError as exc:  # a connection failure is a failed request too
                    out.append((0, "", repr(exc)))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "load workers hang"

    def all(self) -> list[tuple[int, str, str]]:
        return [r for worker in self.results for r in worker]

    def count(self, version: str) -> int:
        return sum(1 for _, v, _ in self.all() if v == version)


def make_reward_checkpoint(policy_dir: Path, out_dir: Path, seed: int) -> Path:
    """A reward model (sequence-classification head, 1 label) on the tiny policy's body, head seeded."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    model.save_pretrained(out_dir, safe_serialization=True)
    bundled_tokenizer().save_pretrained(out_dir)
    return out_dir


def make_short_context_checkpoint(out_dir: Path, positions: int = 12) -> Path:
    """A GPT-2 with the bundled tokenizer whose learned position table has only `positions` rows.

    A real fault, not a mock: it loads, shares the serving tokenizer, prefills short prompts and then
    fails for real (IndexError in its position embedding) once a request passes `positions` tokens —
    the engine limits requests by its own max_total_tokens, not by the model's context."""
    tok = bundled_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
