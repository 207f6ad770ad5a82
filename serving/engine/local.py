"""Async clients for the in-process engines: what the services call when the model runs here."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import AsyncIterator, Callable

import torch

from serving.engine.client import EngineClient, RewardClient
from serving.engine.engine import LocalEngine, Request
from serving.engine.reward import render_pair, reward_scores
from serving.engine.types import EngineInfo, SamplingParams, ScoreResult, StepOutput
from serving.errors import EngineUnavailable, PromptTooLong
from serving.models import LoadedPolicy, LoadedReward


class LocalEngineClient(EngineClient):
    def __init__(self, policy: LoadedPolicy, *, max_batch_size: int = 32, max_queue: int = 128,
                 max_input_tokens: int = 2048, max_total_tokens: int = 4096) -> None:
        self.policy = policy
        self.engine = LocalEngine(policy.model, policy.tokenizer, policy.eos_token_ids,
                                  max_batch_size=max_batch_size, max_queue=max_queue,
                                  max_input_tokens=max_input_tokens, max_total_tokens=max_total_tokens)

    @property
    def model_version(self) -> str:
        return self.policy.model_version

    def info(self) -> EngineInfo:
        p = next(self.policy.model.parameters())
        e = self.engine
        return EngineInfo(self.policy.model_id, self.policy.model_version, str(p.dtype).removeprefix("torch."),
                          p.device.type, e.max_input_tokens, e.max_total_tokens, e.max_batch_size, e.max_queue)

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

    async def generate(self, prompt: str, params: SamplingParams, request_id: str) -> AsyncIterator[StepOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item) -> None:  # engine thread → event loop
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                req.cancelled = True

        req = Request(request_id, self._encode(prompt), params, emit)
        self.engine.submit(req)  # raises PromptTooLong / Overloaded before anything is streamed
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


class LocalRewardClient(RewardClient):
    """Scores pairs in batches, one batch at a time.

    `run_job` runs a function on the thread that does the process's torch work (the generation
    engine's, see LocalEngine.run_job); without one, scoring gets a single thread of its own.
    """

    def __init__(self, reward: LoadedReward, max_length: int = 4096,
                 run_job: Callable[[Callable[[], object]], concurrent.futures.Future] | None = None) -> None:
        self.reward = reward
        self.max_length = max_length
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

    async def score(self, pairs) -> ScoreResult:
        return await asyncio.wrap_future(self._run_job(functools.partial(self._score_sync, pairs)))

    async def stop(self) -> None:
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False, cancel_futures=True)

    def _score_sync(self, pairs) -> ScoreResult:
        tok = self.reward.tokenizer
        texts = [render_pair(tok, p, r) for p, r in pairs]
        enc = [tok.encode(t, add_special_tokens=False) for t in texts]
        longest = max(len(e) for e in enc)
        if longest > self.max_length:
            raise PromptTooLong(f"a (prompt, response) pair has {longest} tokens; the reward model "
                                f"reads at most {self.max_length}")
        device = next(self.reward.model.parameters()).device
        pad = self.reward.model.config.pad_token_id or 0
        ids = torch.full((len(enc), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), longest), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        with torch.inference_mode():
            scores = reward_scores(self.reward.model, ids.to(device), mask.to(device))
        return ScoreResult([float(s) for s in scores.cpu()], self.model_version)
