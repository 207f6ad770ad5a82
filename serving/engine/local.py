"""Async clients for the in-process engines: what the services call when the model runs here."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import AsyncIterator, Callable

import torch

from serving.engine.client import EngineClient, RewardClient
from serving.engine.engine import LocalEngine, Request
from serving.engine.reward import render_pair, reward_scores
from serving.engine.types import EngineInfo, Routing, SamplingParams, ScoreResult, StepOutput
from serving.errors import EngineUnavailable, PromptTooLong
from serving.models import LoadedPolicy, LoadedReward


class LocalEngineClient(EngineClient):
    """The in-process engine behind the EngineClient interface, with several model versions at once.

    `add_version` loads a model into a lane of its own (not routed yet); `set_routing` decides which
    version new requests run on (serving, plus a canary share). A request's version is fixed at
    submit; running requests finish on the weights they started with; a version no longer routed is
    unloaded once drained (the engine logs it). Prompts are tokenised (and chats rendered) with the
    serving version's tokenizer before the version is drawn, so every loaded version must share it.
    """

    def __init__(self, policy: LoadedPolicy, *, max_batch_size: int = 32, max_queue: int = 128,
                 max_input_tokens: int = 2048, max_total_tokens: int = 4096) -> None:
        self._lock = threading.Lock()  # _policies and the engine's lanes change together
        self._policies: dict[str, LoadedPolicy] = {policy.model_version: policy}
        self.engine = LocalEngine(policy.model, policy.tokenizer, policy.eos_token_ids,
                                  model_version=policy.model_version, max_batch_size=max_batch_size,
                                  max_queue=max_queue, max_input_tokens=max_input_tokens,
                                  max_total_tokens=max_total_tokens, on_lane_dropped=self._forget)

    # -- versions and routing ---------------------------------------------------------------------
    @property
    def policy(self) -> LoadedPolicy:
        """The serving version's policy."""
        with self._lock:
            return self._policies[self.engine.routing.serving]

    @property
    def model_version(self) -> str:
        """The serving version: what new requests run on, except the canary's share."""
        return self.engine.routing.serving

    @property
    def routing(self) -> Routing:
        return self.engine.routing

    def add_version(self, policy: LoadedPolicy) -> str:
        """Make a loaded policy available (not routed yet); returns its version. A version already
        loaded is left as it is. ValueError if its tokenizer differs from the serving one's."""
        with self._lock:
            version = policy.model_version
            if version in self._policies:
                return version
            serving = self._policies[self.engine.routing.serving]
            problem = _tokenizer_mismatch(serving, policy)
            if problem:
                raise ValueError(f"cannot load model version {version!r} beside {serving.model_version!r}: "
                                 f"{problem}. Prompts are tokenised before a version is chosen, so every "
                                 "loaded version must use the serving version's tokenizer")
            self._policies[version] = policy
            self.engine.add_lane(version, policy.model, policy.tokenizer, policy.eos_token_ids)
        return version

    def set_routing(self, routing: Routing) -> None:
        """Atomically switch where new requests go. KeyError if a version named is not loaded."""
        self.engine.set_routing(routing)

    def remove_version(self, model_version: str) -> None:
        """Unload a version the routing does not name (once its requests finish). ValueError if routed."""
        self.engine.retire_lane(model_version)

    def versions(self) -> dict[str, dict]:
        """{version: {"running": n, "waiting": n, "share": percent of new requests}} per loaded version."""
        return self.engine.versions()

    def _forget(self, model_version: str) -> None:
        """The engine dropped the lane (engine thread): release our reference to the policy too."""
        with self._lock:
            if model_version not in self.engine.versions():  # not re-added in the meantime
                self._policies.pop(model_version, None)

    # -- EngineClient -----------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        policy = self.policy
        p = next(policy.model.parameters())
        e = self.engine
        return EngineInfo(policy.model_id, policy.model_version, str(p.dtype).removeprefix("torch."),
                          p.device.type, e.max_input_tokens, e.max_total_tokens, e.max_batch_size, e.max_queue,
                          extra={"routing": e.routing.as_dict(), "versions": e.versions()})

    def render_chat(self, messages: list[dict]) -> str:
        tok = self.policy.tokenizer
        if not getattr(tok, "chat_template", None):
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def _encode(self, text: str) -> list[int]:
        # Chat-templated prompts carry their own special tokens; plain prompts are taken as given.
        return self.policy.tokenizer.encode(text, add_special_tokens=False)

    def stats(self) -> dict:
        return self.engine.stats()

    def check_health(self) -> None:
        if not self.engine.alive:
            raise EngineUnavailable("the generation engine is not running")

    async def start(self) -> None:
        self.engine.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.stop)

    async def generate(self, prompt: str, params: SamplingParams, request_id: str,
                       model_version: str | None = None) -> AsyncIterator[StepOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item) -> None:  # engine thread → event loop
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                req.cancelled = True

        req = Request(request_id, self._encode(prompt), params, emit, model_version=model_version)
        # raises PromptTooLong / UnknownModelVersion / Overloaded before anything is streamed; fixes
        # req.model_version (the routing's draw when None)
        self.engine.submit(req)
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if item.finish_reason is not None:
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:
                self.engine.abort(req)


def _tokenizer_mismatch(serving: LoadedPolicy, candidate: LoadedPolicy) -> str | None:
    """Why `candidate` cannot share requests tokenised for `serving`, or None."""
    a, b = len(serving.tokenizer), len(candidate.tokenizer)
    if a != b:
        return f"its tokenizer has {b} tokens, the serving one {a}"
    if set(serving.eos_token_ids) != set(candidate.eos_token_ids):
        return (f"its eos token ids are {sorted(candidate.eos_token_ids)}, "
                f"the serving ones {sorted(serving.eos_token_ids)}")
    return None


class LocalRewardClient(RewardClient):
    """Scores pairs in batches, one batch at a time.

    `run_job` runs a function on the thread that does the process's torch work (the generation
    engine's, see LocalEngine.run_job); without one, scoring gets a single thread of its own.
    `swap` replaces the reward model: each call captures the model when it is submitted, so a job
    already queued or running finishes on the model it captured and later calls use the new one.
    """

    def __init__(self, reward: LoadedReward, max_length: int = 4096,
                 run_job: Callable[[Callable[[], object]], concurrent.futures.Future] | None = None) -> None:
        self.reward = reward
        self.max_length = max_length
        self._lock = threading.Lock()
        self._own_executor = None
        if run_job is None:
            self._own_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="feedloop-reward")
            run_job = self._own_executor.submit
        self._run_job = run_job

    @property
    def model_version(self) -> str:
        return self.reward.model_version

    @property
    def trained(self) -> bool:
        return self.reward.trained

    def swap(self, reward: LoadedReward) -> str:
        """Score new calls with `reward`; returns the version it replaces."""
        with self._lock:
            previous, self.reward = self.reward, reward
        return previous.model_version

    async def score(self, pairs) -> ScoreResult:
        reward = self.reward  # captured now: a swap after this point does not touch this call
        return await asyncio.wrap_future(self._run_job(functools.partial(self._score_sync, reward, pairs)))

    async def stop(self) -> None:
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False, cancel_futures=True)

    def _score_sync(self, reward: LoadedReward, pairs) -> ScoreResult:
        tok = reward.tokenizer
        texts = [render_pair(tok, p, r) for p, r in pairs]
        enc = [tok.encode(t, add_special_tokens=False) for t in texts]
        longest = max(len(e) for e in enc)
        if longest > self.max_length:
            raise PromptTooLong(f"a (prompt, response) pair has {longest} tokens; the reward model "
                                f"reads at most {self.max_length}")
        device = next(reward.model.parameters()).device
        pad = reward.model.config.pad_token_id or 0
        ids = torch.full((len(enc), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), longest), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        with torch.inference_mode():
            scores = reward_scores(reward.model, ids.to(device), mask.to(device))
        return ScoreResult([float(s) for s in scores.cpu()], reward.model_version)
