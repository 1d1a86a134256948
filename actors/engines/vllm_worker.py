"""vLLM worker extension: in-place weight reload inside each vLLM worker process.

Who calls it: vLLM itself mixes ``WeightReloadExtension`` into its worker class when the
engine is built with ``worker_extension_cls="actors.engines.vllm_worker.WeightReloadExtension"``;
``VLLMEngine.load_weights`` then runs ``llm.collective_rpc("prime_reload_weights", args=(paths,))``.
Arguments are plain strings (paths of ``.safetensors`` files, e.g. in /dev/shm): tensors are
never sent through the RPC, which would need vLLM's insecure pickle serialisation.

What a reload does (the CPU build needs every step; on GPU the extra steps are harmless):
1. ``model_runner.reload_weights(weights_iterator=..., is_checkpoint_format=True)`` -- vLLM's
   layer-wise reload takes checkpoint (transformers) names, fuses q/k/v and gate/up, and re-runs
   each layer's ``process_weights_after_loading`` (on CPU that re-packs the linear weights;
   a plain ``model.load_weights`` fails there because the packed layers' ``.weight`` is empty);
2. with tied embeddings the checkpoint has no ``lm_head.weight`` and the reload leaves the
   output layer alone: it is re-tied to the (new) embedding and re-processed, otherwise the
   CPU build keeps computing logits from the old, pre-packed copy.
The caller resets the prefix cache afterwards (cached KV blocks hold old-policy activations).

Weight sync into the worker (``prime_sync_join`` / ``prime_sync_load``): with gloo/NCCL
weight sync the worker itself joins the learner's sender as a member
(``common.weight_sync.collective``), takes every update in the background into its own
device memory (NCCL: the GPU, no host round trip) and, when the actor asks, reloads the
newest one from those tensors through the same path as above. Each worker (tensor-parallel
rank) is its own member and takes the whole state.

Not covered: sharded (tensor-parallel) transfer (every worker receives everything), LoRA,
quantised models. Importing this module must stay cheap: it is imported in every worker.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def _iter_files(paths: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in paths:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _tied(model_config) -> bool:
    cfg = model_config.hf_config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False))


def _embedding(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "model", None)
    emb = getattr(inner, "embed_tokens", None)
    if emb is None:
        raise AttributeError(f"{type(model).__name__}: no model.embed_tokens to tie lm_head to")
    return emb


class WeightReloadExtension:
    """Methods added to vLLM's worker (``self`` is the worker: it has ``model_runner``)."""

    def prime_reload_weights(self, paths: list[str]) -> int:
        """Load every tensor in ``paths`` in place; returns how many tensors were read."""
        return self._prime_reload(_iter_files(paths))

    # ---- gloo/NCCL weight sync straight into this worker (no file, no actor-process copy)

    def prime_sync_join(self, backend: str, addr: str, timeout_s: float, connect_timeout_s: float, label: str) -> bool:
        """Join the learner's weight-sync sender at ``addr`` from inside this worker; updates
        then arrive in the background into this worker's device (NCCL: its GPU)."""
        from common.weight_sync import make_receiver

        self.prime_sync_close()
        device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else None
        self._prime_rx = make_receiver(backend, addr=addr, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                                       device=device, label=label)
        return True

    def prime_sync_load(self, min_version: int, timeout_s: float) -> list[int]:
        """Wait up to ``timeout_s`` for an update not taken before; load it in place if its
        version is newer than ``min_version``. Returns [version, tensors loaded (0: kept)]."""
        rx = getattr(self, "_prime_rx", None)
        if rx is None:
            raise RuntimeError("prime_sync_load before prime_sync_join")
        version, state = rx.receive(timeout_s=timeout_s)
        if version <= min_version:
            return [int(version), 0]
        return [int(version), self._prime_reload(iter(state.items()))]

    def prime_sync_close(self) -> bool:
        rx = getattr(self, "_prime_rx", None)
        self._prime_rx = None
        if rx is not None:
            rx.close()
        return True

    def _prime_reload(self, items: Iterator[tuple[str, torch.Tensor]]) -> int:
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in items:
                count += 1
                yield item

        runner = self.model_runner  # type: ignore[attr-defined]
        runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        model = runner.get_model()
        if _tied(runner.model_config) and hasattr(model, "lm_head"):
            lm_head, emb = model.lm_head, _embedding(model)
            if lm_head.weight is not emb.weight:
                lm_head.weight = emb.weight
            lm_head.quant_method.process_weights_after_loading(lm_head)
        return count
