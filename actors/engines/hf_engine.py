"""Transformers backend: ``model.generate`` with a KV cache, batched left-padded prompts.

Who calls it: ``make_engine("hf", ...)`` on machines without vLLM (and tests). It keeps the
contract of ``actors.engines.base``. How the behaviour log-probs are obtained: generate is
given an explicit processor list ``[temperature, top-p, recorder]`` and a clean generation
config (no top-k, no repetition penalty, nothing inherited from the checkpoint's
``generation_config.json``), so the recorder sees exactly the scores that are sampled from;
it keeps ``log_softmax`` of them and picks out the chosen token's value on the next step
(the last token is picked after generate returns). Memory stays O(batch × vocab), not
O(steps × batch × vocab) as with ``output_scores``.

Invariants: sampling is reproducible for a given ``seed``, row by row: each (prompt, sample)
row draws its tokens from its own generator seeded ``prompt_seed(seed, i, k) + j`` (the
``_RowSampler`` processor; the global torch RNG is left as it was), so a row's response does
not depend on the other rows of the call; left padding is handled by the attention mask (generate
derives position ids from it). Not covered: streaming, speculative decoding, multi-GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from actors.engines.base import (
    Engine,
    Sample,
    Seed,
    Weights,
    check_sampling_args,
    check_seed,
    eos_token_ids as read_eos_token_ids,
    iter_safetensors,
    prompt_seed,
    safetensors_files,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _LogprobRecorder:
    """Last logits processor: records log_softmax of the final scores; on each call it
    gathers the log-prob of the token sampled at the previous step (``input_ids[:, -1]``)."""

    def __init__(self) -> None:
        self._prev: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self._prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self._prev is not None:
            self.logprobs.append(self._prev.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
            self._prev = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probs of the T generated tokens (the last columns of ``sequences``)."""
        self._take(sequences[:, -1])
        return torch.stack(self.logprobs, dim=1) if self.logprobs else sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] input ids and attention mask, prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def cut_at_eos(tokens: list[int], logprobs: list[float], eos: set[int], policy_version: int) -> Sample:
    """Truncate after the first end-of-sequence id (kept) and set the finish reason."""
    for t, tok in enumerate(tokens):
        if tok in eos:
            return Sample(tokens[: t + 1], logprobs[: t + 1], "stop", policy_version)
    return Sample(tokens, logprobs, "length", policy_version)


class _RowSampler:
    """Last logits processor when sampling: draws each row's token from softmax(scores) with
    that row's own generator (inverse CDF of one uniform per row and step) and returns a
    one-hot of it, so row i's tokens depend on ``seeds[i]`` and its own scores only, never on
    which rows share the batch (the global torch RNG is not touched)."""

    def __init__(self, seeds: list[int]) -> None:
        self._gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self._gens])
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)
        pick = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1), right=True)
        pick = pick.clamp_(max=scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, pick, 0.0)


class HFEngine(Engine):
    """``transformers`` generation engine (see module docstring)."""

    kind = "hf"

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        dtype: str = "float32",
        device: str | None = None,
        max_batch_size: int = 64,
        max_model_len: int | None = None,
        seed: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        policy_version: int = 0,
        attn_implementation: str | None = "sdpa",
    ) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        super().__init__(policy_version)
        self.model_path = str(model_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_batch_size = int(max_batch_size)
        self.max_model_len = max_model_len
        # seeds for calls without one: a private stream, so repeated calls differ
        self._seeds = torch.Generator().manual_seed(int(seed))
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=_DTYPES[dtype], attn_implementation=attn_implementation
        ).to(self.device)
        self.model.eval().requires_grad_(False)
        eos = list(eos_token_ids) if eos_token_ids is not None else read_eos_token_ids(self.model_path)
        if not eos:
            raise ValueError(f"no eos_token_id in {self.model_path}; pass eos_token_ids")
        self.eos_token_ids = eos
        pad = self.model.generation_config.pad_token_id
        self.pad_token_id = int(pad if isinstance(pad, int) else eos[0])
        # a clean config, so nothing from the checkpoint's generation_config.json (top_k,
        # repetition_penalty, min_p, ...) silently changes the sampling distribution
        self.model.generation_config = GenerationConfig(
            eos_token_id=eos, pad_token_id=self.pad_token_id, bos_token_id=None
        )

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
        if self.max_model_len is not None and max(len(p) for p in prompts) >= self.max_model_len:
            raise ValueError(f"a prompt is as long as max_model_len={self.max_model_len} or longer")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        rows = [list(p) for p in prompts for _ in range(k)]
        seeds = [prompt_seed(seed, i, k) + j for i in range(len(prompts)) for j in range(k)]
        samples: list[Sample] = []
        for start in range(0, len(rows), self.max_batch_size):
            end = start + self.max_batch_size
            samples += self._generate_batch(rows[start:end], temperature, top_p, max_tokens, seeds[start:end])
        return [samples[i * k:(i + 1) * k] for i in range(len(prompts))]

    def _generate_batch(self, rows: list[list[int]], temperature: float, top_p: float,
                        max_tokens: int, seeds: list[int]) -> list[Sample]:
        from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        ids, mask = left_pad(rows, self.pad_token_id)
        caps = [self._response_cap(len(r), max_tokens) for r in rows]
        recorder = _LogprobRecorder()
        procs: list = []
        greedy = temperature == 0  # argmax; the recorder then sees the unscaled scores
        if not greedy and temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if not greedy and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
        procs.append(recorder)
        if not greedy:  # sampled here, row by row; generate's own step then takes the argmax of a one-hot
            procs.append(_RowSampler(seeds))
        cfg = GenerationConfig(
            do_sample=False, max_new_tokens=max(caps),
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id, use_cache=True,
        )
        with torch.no_grad():
            seqs = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                generation_config=cfg, logits_processor=LogitsProcessorList(procs),
            )
        new = seqs[:, ids.shape[1]:].cpu()
        lps = recorder.finish(seqs).cpu()
        assert lps.shape == new.shape, (lps.shape, new.shape)
        eos = set(self.eos_token_ids)
        return [cut_at_eos(new[i, :caps[i]].tolist(), lps[i, :caps[i]].tolist(), eos, self._policy_version)
                for i in range(len(rows))]

    def _response_cap(self, prompt_len: int, max_tokens: int) -> int:
        """Longest response allowed: ``max_tokens``, and (as in vLLM) prompt + response
        within ``max_model_len``."""
        if self.max_model_len is None:
            return max_tokens
        return min(max_tokens, self.max_model_len - prompt_len)

    # ------------------------------------------------------------------ weights
    def _load_weights(self, weights: Weights) -> None:
        if isinstance(weights, (str, os.PathLike)):
            state = dict(iter_safetensors(safetensors_files(weights)))
        else:
            state = dict(weights)
        load_into(self.model, state)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model``'s parameters in place. Missing keys are allowed only
    for parameters tied to one that is present (a tied ``lm_head.weight``); unknown keys
    are an error."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = set(state) - set(params)
    if unknown:
        raise KeyError(f"unknown parameter names: {sorted(unknown)[:5]}")
    loaded_storages = {params[n].data_ptr() for n in state}
    missing = [n for n, p in params.items() if n not in state and p.data_ptr() not in loaded_storages]
    if missing:
        raise KeyError(f"weights missing for: {missing[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
