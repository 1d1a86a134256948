"""vLLM ``AsyncLLM`` backend with in-flight weight updates and per-token policy versions.

Who calls it: ``make_engine("vllm-async", ...)`` in an actor process whose config sets
``async.inflight_weight_updates``. The actor runs ``generate`` in a worker thread and calls
``load_weights`` from its main thread *while that generation is running*; both calls are
thread-safe (all vLLM work happens on one private asyncio event-loop thread).

How an in-flight update works (PipelineRL-style): ``pause_generation(mode="keep")`` freezes
the running requests in the scheduler, the tokens already produced are drained to this
engine's consumers, every worker reloads the weights in place (the same worker extension
as ``VLLMEngine``), the engine's ``policy_version`` is bumped, and generation resumes. Tokens
sampled after the resume come from the new weights, so ``Sample.token_versions`` records,
per token, the version that sampled it (non-decreasing within a sample; ``Sample.policy_version``
is the version at the start of the call). The frozen requests keep their KV cache, computed
by the old weights for the earlier positions: their new tokens are sampled from a mixed
policy, and the recorded behaviour log-probs are those of that actual sampling distribution,
which is what the learner's importance correction needs. The prefix cache is reset when the
engine is idle (at once when no request is running, else before the next ``generate``).

Exactness of the token/version boundary: the drain step waits until the engine core's
output queue is empty and every running request's output collector has been consumed
(stable over several event-loop turns, up to ``drain_timeout_s``); the version is bumped on
the same event-loop thread that tags tokens, so a token is tagged new only if it arrived
after the pause. A drain timeout is logged and counted in ``drain_timeouts``.

Sampling semantics (``logprobs_mode="processed_logprobs"``, ``skip_tokenizer_init``,
``stop_token_ids``, CPU defaults) are those of ``actors.engines.vllm_engine``.

Not covered: aborting requests on update (``mode="abort"``), NCCL weight transfer, more
than one engine per process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from actors.engines.base import (
    Engine,
    Sample,
    Seed,
    Weights,
    check_sampling_args,
    check_seed,
    check_version,
    prompt_seed,
    safetensors_files,
    write_shm_safetensors,
)
from actors.engines.vllm_engine import engine_args

log = logging.getLogger(__name__)


class _Child:
    __slots__ = ("tokens", "logprobs", "versions", "reason")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.reason: str | None = None


class VLLMAsyncEngine(Engine):
    """``AsyncLLM`` generation engine; ``load_weights`` may run during ``generate``."""

    kind = "vllm-async"
    inflight_updates = True

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        dtype: str | None = None,
        max_model_len: int = 4096,
        seed: int = 0,
        enforce_eager: bool | None = None,
        eos_token_ids: Sequence[int] | None = None,
        policy_version: int = 0,
        drain_timeout_s: float = 5.0,
        **engine_kwargs: Any,
    ) -> None:
        super().__init__(policy_version)
        self.model_path, self.eos_token_ids, vllm_args = engine_args(
            model_path, dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
            eos_token_ids=eos_token_ids, **engine_kwargs)
        from vllm import AsyncEngineArgs

        self.drain_timeout_s = float(drain_timeout_s)
        self.drain_timeouts = 0
        self.inflight_loads = 0  # updates applied while requests were running
        self._ids = itertools.count()
        self._prefix_dirty = False
        self._running = 0  # generate() calls in progress (loop thread only)
        self.tokens_streamed = 0  # sampled tokens received from the engine so far (progress, for monitoring)
        self._update_lock = threading.Lock()
        args = AsyncEngineArgs(**vllm_args)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-async-loop", daemon=True)
        self._thread.start()
        self.llm = None
        try:
            self.llm = self._call(self._build(args))
        except BaseException:
            self._stop_loop()
            raise

    # ------------------------------------------------------------------ plumbing
    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @staticmethod
    async def _build(args):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(args)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        k: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: Seed = None,
    ) -> list[list[Sample]]:
        check_sampling_args(prompts, k, temperature, top_p, max_tokens)
        check_seed(seed, len(prompts))
        if temperature == 0:  # vLLM's greedy mode (evaluation); top-p is meaningless there
            top_p = 1.0
        return self._call(self._generate_all([list(p) for p in prompts], k, temperature, top_p, max_tokens, seed))

    async def _generate_all(self, prompts, k, temperature, top_p, max_tokens, seed) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._prefix_dirty and self._running == 0:
            await self._reset_prefix_cache()
        start_version = self._policy_version
        self._running += 1
        try:
            jobs = []
            for i, p in enumerate(prompts):
                params = SamplingParams(
                    n=k, temperature=temperature, top_p=top_p, top_k=0, max_tokens=max_tokens,
                    seed=prompt_seed(seed, i, k), logprobs=0, detokenize=False,
                    stop_token_ids=list(self.eos_token_ids), output_kind=RequestOutputKind.DELTA,
                )
                jobs.append(self._one(p, params, k, f"prime-{next(self._ids)}"))
            children = await asyncio.gather(*jobs)
        finally:
            self._running -= 1
        out = []
        for per in children:
            samples = []
            for ch in per:
                if ch.reason not in ("stop", "length"):
                    raise RuntimeError(f"unexpected vLLM finish reason {ch.reason!r}")
                samples.append(Sample(ch.tokens, ch.logprobs, ch.reason, start_version, ch.versions))
            out.append(samples)
        return out

    async def _one(self, prompt: list[int], params, k: int, request_id: str) -> list[_Child]:
        children = [_Child() for _ in range(k)]
        async for out in self.llm.generate({"prompt_token_ids": prompt}, params, request_id=request_id):
            version = self._policy_version  # read on the loop thread: see the module docstring
            for c in out.outputs:
                ch = children[c.index]
                toks = list(c.token_ids)
                ch.tokens.extend(toks)
                ch.logprobs.extend(float(step[t].logprob) for t, step in zip(toks, c.logprobs or []))
                ch.versions.extend([version] * len(toks))
                self.tokens_streamed += len(toks)
                if c.finish_reason is not None:
                    ch.reason = c.finish_reason
        for ch in children:
            if len(ch.logprobs) != len(ch.tokens):
                raise RuntimeError(f"{request_id}: {len(ch.tokens)} tokens but {len(ch.logprobs)} log-probs")
        return children

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Weights, version: int) -> None:
        """Load ``weights`` as ``version``; safe to call while ``generate`` runs in another thread."""
        with self._update_lock:
            if not self._rewind:
                check_version(self._policy_version, version)
            if isinstance(weights, (str, os.PathLike)):
                self._call(self._update(safetensors_files(weights), int(version)))
            else:
                path = write_shm_safetensors(weights)
                try:
                    self._call(self._update([path], int(version)))
                finally:
                    os.unlink(path)
            self._rewind = False

    def _load_weights(self, weights: Weights) -> None:  # pragma: no cover - load_weights is overridden
        raise NotImplementedError

    async def _update(self, paths: list[str], version: int) -> None:
        running = self._running > 0
        if running:
            await self.llm.pause_generation(mode="keep", clear_cache=False)
        try:
            if running:
                await self._drain()
            counts = await self.llm.collective_rpc("prime_reload_weights", args=(paths,))
            if not counts or not all(counts):
                raise RuntimeError(f"weight reload read no tensors from {paths} (per worker: {counts})")
            self._policy_version = version
            if running:
                self.inflight_loads += 1
        finally:
            if running:
                await self.llm.resume_generation()
        self._prefix_dirty = True
        if self._running == 0:
            await self._reset_prefix_cache()

    async def _reset_prefix_cache(self) -> None:
        if await self.llm.reset_prefix_cache():
            self._prefix_dirty = False

    async def _drain(self) -> None:
        """Wait until every token produced before the pause has reached ``_one``."""
        deadline = time.monotonic() + self.drain_timeout_s
        stable = 0
        while stable < 3:
            if time.monotonic() > deadline:
                self.drain_timeouts += 1
                log.warning("vllm-async: outputs not drained after %.1f s; token versions near the "
                            "boundary may be off", self.drain_timeout_s)
                return
            await asyncio.sleep(0.005)
            stable = stable + 1 if self._drained() else 0

    def _drained(self) -> bool:
        q = getattr(self.llm.engine_core, "outputs_queue", None)
        if q is not None and not q.empty():
            return False
        for state in self.llm.output_processor.request_states.values():
            collector = getattr(state, "queue", None)
            if collector is not None and collector.output is not None:
                return False
        return True

    # ------------------------------------------------------------------ teardown
    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    @staticmethod
    async def _shutdown(llm) -> None:
        """Shut the engine down on its own loop, then let the tasks it leaves (its output
        handler) finish their cancellation before the loop stops."""
        llm.shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            if self._loop.is_running():
                self._call(self._shutdown(llm), timeout=60)
            else:
                llm.shutdown()
        finally:
            self._stop_loop()
