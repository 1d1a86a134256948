"""The generation-engine contract every actor backend implements, and its shared helpers.

Who calls it: an actor process builds one engine with ``actors.engines.make_engine`` and
then alternates ``generate`` (a batch of prompts, K samples each) with ``load_weights``
(a new policy from the learner). The learner never touches an engine.

Invariants every backend keeps:
- ``generate`` returns one list per prompt, in prompt order, each with exactly ``k``
  ``Sample``s. ``Sample.token_ids`` are the response tokens only (no prompt), including the
  stop token when ``finish_reason == "stop"``; ``Sample.logprobs[t]`` is the log-prob of
  ``token_ids[t]`` under the distribution it was *actually sampled from*: logits / temperature,
  then the top-p nucleus renormalised (with ``top_p == 1`` this is exactly
  ``learner.logprobs.token_logprobs`` at the same temperature). ``finish_reason`` is
  ``"stop"`` (an end-of-sequence id was sampled) or ``"length"`` (``max_tokens`` reached).
- All K samples of a call come from one policy version, recorded in ``Sample.policy_version``
  -- except on an engine with ``inflight_updates`` (``vllm-async``), where ``load_weights``
  may land mid-call: ``Sample.policy_version`` is then the version at the start of the call
  and ``Sample.token_versions`` the version that sampled each token (non-decreasing).
- ``load_weights(weights, version)`` replaces the weights in place (no restart) and sets
  ``policy_version``; versions never decrease. ``weights`` is a ``{name: tensor}`` state dict
  in transformers' naming, a ``.safetensors`` file, or a directory of them.

Not covered here: tokenisation and chat templates (prompts arrive as token ids), how weights reach the actor (common/weight_sync.py), and
behaviour log-probs for greedy decoding: ``temperature=0`` (evaluation) picks the argmax at
every step, needs ``k == 1`` and ignores ``top_p``/``seed``; its ``Sample.logprobs`` are those
of the unscaled (temperature 1) distribution, diagnostics only -- the actor never asks for it.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import torch

FinishReason = Literal["stop", "length"]
Weights = Union[Mapping[str, torch.Tensor], str, os.PathLike]


@dataclass(frozen=True)
class Sample:
    """One sampled response. ``len(token_ids) == len(logprobs)``."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int
    token_versions: list[int] | None = None  # per token; None = policy_version for every token

    def versions(self) -> list[int]:
        """The policy version of every token."""
        if self.token_versions is None:
            return [self.policy_version] * len(self.token_ids)
        return list(self.token_versions)


class Engine(ABC):
    """Common API of the generation backends (see the module docstring for the contract)."""

    kind: str = "abstract"
    inflight_updates: bool = False  # True: load_weights may be called while generate runs
    in_engine_sync: bool = False  # True: join_weight_sync / load_synced_weights (gloo/NCCL into the engine)
    eos_token_ids: list[int]  # ids that end a response (set by each backend)

    def __init__(self, policy_version: int = 0) -> None:
        self._policy_version = int(policy_version)
        self._rewind = False

    def allow_rewind(self) -> None:
        """Let the next load take any version, older ones included: a restarted learner
        re-publishes the version of its checkpoint, which may be older than this engine's."""
        self._rewind = True

    @property
    def rewinding(self) -> bool:
        """``allow_rewind`` was called and no load has happened since."""
        return self._rewind

    @property
    def policy_version(self) -> int:
        """Version of the weights the next ``generate`` call samples from."""
        return self._policy_version

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        k: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: Seed = None,
    ) -> list[list[Sample]]:
        """Sample ``k`` responses per prompt; returns ``[len(prompts)][k]`` samples. Sample j
        of prompt i is drawn from the stream ``prompt_seed(seed, i, k) + j`` alone, so it does
        not depend on which other prompts share the call."""

    def load_weights(self, weights: Weights, version: int) -> None:
        """Replace the weights in place and record ``version`` as the policy version."""
        if not self._rewind:
            check_version(self._policy_version, version)
        self._load_weights(weights)
        self._policy_version = int(version)
        self._rewind = False

    def join_weight_sync(self, backend: str, addr: str, *, timeout_s: float, connect_timeout_s: float,
                         label: str) -> None:
        """(``in_engine_sync`` engines) Join the learner's gloo/NCCL weight-sync sender from
        inside the engine, so updates land in its own memory."""
        raise NotImplementedError(f"{self.kind} engine takes weights through load_weights only")

    def load_synced_weights(self, timeout_s: float) -> int:
        """(``in_engine_sync`` engines) Load the newest update received since the last call if
        it is newer than ``policy_version``; returns ``policy_version`` afterwards."""
        raise NotImplementedError(f"{self.kind} engine takes weights through load_weights only")

    @abstractmethod
    def _load_weights(self, weights: Weights) -> None:
        """Backend part of ``load_weights``."""

    @abstractmethod
    def close(self) -> None:
        """Free the model (and any engine processes). Idempotent."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_version(current: int, new: int) -> None:
    """Versions may repeat (a re-broadcast after a restart) but never go backwards."""
    if int(new) < current:
        raise ValueError(f"policy version went backwards: {current} -> {new}")


def check_sampling_args(prompts: Sequence[Sequence[int]], k: int, temperature: float,
                        top_p: float, max_tokens: int) -> None:
    """Raise ValueError on arguments no backend supports."""
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    if temperature == 0:  # greedy (evaluation): see the module docstring
        if k != 1:
            raise ValueError(f"greedy decoding (temperature 0) needs k == 1 (got {k})")
    elif not temperature > 0:
        raise ValueError(f"temperature must be > 0, or 0 for greedy (got {temperature})")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (got {max_tokens})")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")


Seed = Union[int, Sequence[int], None]  # one for the call, one per prompt, or none (engine's own stream)

_SEED_MOD = 1 << 63


def check_seed(seed: Seed, n_prompts: int) -> None:
    """Raise ValueError unless ``seed`` is None, an int, or one seed per prompt."""
    if seed is not None and not isinstance(seed, int) and len(seed) != n_prompts:
        raise ValueError(f"{len(seed)} seeds for {n_prompts} prompts")


def prompt_seed(seed: Seed, prompt_index: int, k: int) -> int | None:
    """Per-prompt seed: ``seed[prompt_index]`` when ``seed`` is a per-prompt sequence, else
    ``seed + prompt_index * k``, such that (prompt, sample) pairs never share a random stream
    when a backend derives sample j's seed as ``prompt_seed + j``."""
    if seed is None:
        return None
    if isinstance(seed, Sequence):
        return int(seed[prompt_index]) % _SEED_MOD
    return (int(seed) + prompt_index * k) % _SEED_MOD


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (splitmix64 over each in turn), so that e.g.
    (run seed, policy version, prompt index) give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x % _SEED_MOD


def eos_token_ids(model_path: str | os.PathLike) -> list[int]:
    """End-of-sequence ids of a transformers model directory: ``generation_config.json``'s
    ``eos_token_id`` if present, else ``config.json``'s; an int or a list in either file."""
    path = Path(model_path)
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if not f.is_file():
            continue
        value = json.loads(f.read_text()).get("eos_token_id")
        if value is None:
            continue
        ids = [value] if isinstance(value, int) else list(value)
        if ids:
            return [int(i) for i in ids]
    return []


def safetensors_files(path: str | os.PathLike) -> list[str]:
    """A ``.safetensors`` file, or every one in a directory (sorted). Raises if none."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    if not files or any(f.suffix != ".safetensors" for f in files):
        raise FileNotFoundError(f"no .safetensors weights at {p}")
    return [str(f) for f in files]


def iter_safetensors(paths: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of every tensor in ``paths``, one file open at a time."""
    from safetensors import safe_open

    for path in paths:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def unshared_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases (tensors whose storage an earlier entry already holds, e.g. a tied
    ``lm_head.weight``) so the dict can be written with safetensors; the engines re-tie on
    load. Tensors are detached, moved to CPU and made contiguous."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.to("cpu").contiguous()
    return out


def write_shm_safetensors(state: Mapping[str, torch.Tensor], directory: str | None = None) -> str:
    """Write ``state`` to a fresh ``.safetensors`` file in RAM-backed ``/dev/shm`` (or the
    temp dir where that does not exist); returns its path. The caller deletes it."""
    from safetensors.torch import save_file

    if directory is None:
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(directory, f"prime-weights-{os.getpid()}-{uuid.uuid4().hex}.safetensors")
    save_file(unshared_state_dict(state), path)
    return path
