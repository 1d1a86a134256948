"""The supervised warm-up: a tiny Qwen2 trained from scratch on the arithmetic task's
imperfect demonstrations until its held-out accuracy plateaus. Cached.

Contract
--------
- Callers: ``launch/warmup.py`` (and the launcher of the default run) through
  ``warmup(out_dir, task_cfg, warmup_cfg) -> dict``; tests. ``task_cfg`` / ``warmup_cfg``
  are the ``task`` / ``warmup`` sections of ``common.config`` (None = their defaults).
- Result: a transformers model directory (``save_pretrained``: config, safetensors,
  tokenizer with its chat template, generation_config with ``eos_token_id``) that
  transformers and vLLM load, plus ``warmup.json`` (the plateau figures, the eval curve,
  the loss curve, the cache key) and ``data/{train,dev,heldout}.jsonl`` (prompt files,
  ``actors.prompts.PromptSource`` layout). The same files are in ``out_dir`` when given.
- Cache: ``<warmup.cache_dir>/<key>`` where ``key`` hashes the task section, the warm-up
  section (minus ``cache_dir`` and ``threads``) and ``CODE_VERSION``. A finished entry is
  never rebuilt: a second call copies it (a ~4 MB model) into ``out_dir`` and returns in well
  under a second. Entries are built in a temporary directory and renamed into place, so a
  crashed build leaves no half entry; concurrent builders each build, the first rename wins.
- Model: ``Qwen2ForCausalLM`` (``warmup.layers`` x ``warmup.hidden_size``, ``warmup.heads``
  heads with head_dim = hidden/heads (vLLM's CPU attention needs >= 32), as many KV heads,
  tied embeddings, vocabulary = the task tokenizer's 22 tokens), float32.
- Loss (``response_ce_loss``): mean cross-entropy over response tokens only (the response
  and its ``<eos>``; prompt and padding are masked). AdamW, global-norm gradient clipping,
  batches drawn without replacement, epoch by epoch, from the demonstrations in a seeded
  order; ``torch.set_num_threads(warmup.threads)`` (restored afterwards).
- Schedule and plateau rule (warmup-stable-decay): linear LR warm-up, then constant LR
  (the stable phase). Every ``eval_every`` steps the model is evaluated on the dev split
  (disjoint from the held-out split): sampled accuracy (``eval_samples`` samples per prompt
  at ``eval_temperature``, fixed seed) and greedy accuracy, both scored by ``verify_math``.
  An evaluation IMPROVES if either accuracy beats its best so far by more than
  ``min_delta`` (the best moves only on an improvement, as in Keras' EarlyStopping;
  ``PlateauTracker``). The stable phase ends at the plateau -- ``patience`` consecutive
  evaluations without an improvement, declared no earlier than step ``min_steps`` -- or when
  ``max_steps - cooldown_steps`` steps or ``max_seconds`` are reached (``stop_reason``).
  Then the LR decays linearly to 0 over ``cooldown_steps`` (this removes the constant-LR
  noise: the model then reproduces the demonstrations' distribution, the optimum of the
  supervised objective, whose sampled accuracy is the demonstrations' own accuracy) and
  training stops. The weights kept are those of the evaluation with the highest dev
  sampled accuracy (in practice the last); they are then scored once on the held-out split
  (the figures the RL run must beat), with a breakdown of the sampled responses
  (``arithmetic.diagnose``: correct / slip / arith / copy / format).
- Determinism: same config, same thread count -> same weights, unless ``max_seconds`` cut
  the run (wall-clock dependent; recorded).
- Shipped entries (``actors.tasks.shipped``): on a cache miss, a shipped entry of the same
  key is checksum-verified and installed instead of training (``use_shipped=False``: train).
Not covered: resuming an interrupted warm-up (it restarts), GPUs (CPU only, by design: the
model is tiny), tasks other than ``arithmetic``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from actors.tasks import arithmetic as ar

log = logging.getLogger(__name__)

__all__ = ["CODE_VERSION", "cache_key", "collate", "response_ce_loss", "PlateauTracker", "sample",
           "evaluate", "build_model", "warmup"]

CODE_VERSION = "warmup-v1"  # bump when a change here alters the trained weights
RESULT_FILE = "warmup.json"


def _sections(task_cfg: Any, warmup_cfg: Any):
    from common.config import TaskConfig, WarmupConfig

    return (task_cfg if task_cfg is not None else TaskConfig(),
            warmup_cfg if warmup_cfg is not None else WarmupConfig())


def cache_key(task_cfg: Any, warmup_cfg: Any) -> str:
    """Hex key of the recipe: task section + warm-up section (less cache_dir, threads) + code version."""
    task_cfg, warmup_cfg = _sections(task_cfg, warmup_cfg)
    recipe = {"code": CODE_VERSION, "task": task_cfg.model_dump(mode="json"),
              "warmup": warmup_cfg.model_dump(mode="json", exclude={"cache_dir", "threads"})}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- pure pieces


def encode_demo(tok, prompt: str, response: str) -> tuple[list[int], int]:
    """``(token ids of prompt + response + <eos>, number of prompt tokens)``."""
    from actors.prompts import to_token_ids

    p = to_token_ids(prompt, tok)
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + list(r), len(p)


def collate(seqs: Sequence[tuple[Sequence[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` [B, L], ``attention_mask`` [B, L] and ``loss_mask`` [B, L-1]
    (1 where position t predicts a response token t+1) from ``(ids, n_prompt)`` pairs."""
    L = max(len(ids) for ids, _ in seqs)
    B = len(seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    loss_mask = torch.zeros(B, L - 1)
    for i, (ids, n_prompt) in enumerate(seqs):
        if not 1 <= n_prompt < len(ids):
            raise ValueError(f"sequence {i}: need 1 <= prompt length ({n_prompt}) < length ({len(ids)})")
        input_ids[i, : len(ids)] = torch.as_tensor(list(ids))
        attn[i, : len(ids)] = 1
        loss_mask[i, n_prompt - 1 : len(ids) - 1] = 1.0
    return input_ids, attn, loss_mask


def response_ce_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions where ``loss_mask`` is 1.
    ``logits`` [B, L, V], ``input_ids`` [B, L], ``loss_mask`` [B, L-1]."""
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                         reduction="none").view_as(loss_mask)
    return (ce * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def lr_factor(step: int, warmup_steps: int, cooldown_start: int | None = None, cooldown_steps: int = 0) -> float:
    """Multiplier of the peak LR for optimiser step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, constant, and from ``cooldown_start`` (once the stable phase has ended)
    a linear decay that reaches 0 after ``cooldown_steps`` steps."""
    f = min(1.0, (step + 1) / max(1, warmup_steps))
    if cooldown_start is not None and cooldown_steps > 0:
        f *= max(0.0, 1.0 - (step - cooldown_start) / cooldown_steps)
    return f


@dataclass
class PlateauTracker:
    """Early stopping on two accuracies (see the module docstring's plateau rule)."""

    patience: int
    min_delta: float
    best_sampled: float = -math.inf
    best_greedy: float = -math.inf
    since_improvement: int = 0
    history: list[tuple[float, float]] = field(default_factory=list)

    def update(self, sampled: float, greedy: float) -> bool:
        """Record an evaluation; True if it improved on the best so far."""
        self.history.append((sampled, greedy))
        improved = False
        if sampled > self.best_sampled + self.min_delta:
            self.best_sampled, improved = sampled, True
        if greedy > self.best_greedy + self.min_delta:
            self.best_greedy, improved = greedy, True
        self.since_improvement = 0 if improved else self.since_improvement + 1
        return improved

    @property
    def plateaued(self) -> bool:
        return self.since_improvement >= self.patience


# ----------------------------------------------------------------------------- model


def build_model(warmup_cfg: Any, tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    w = warmup_cfg
    if w.hidden_size % w.heads:
        raise ValueError(f"warmup.hidden_size ({w.hidden_size}) must be a multiple of warmup.heads ({w.heads})")
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=w.hidden_size, intermediate_size=w.intermediate_size,
        num_hidden_layers=w.layers, num_attention_heads=w.heads, num_key_value_heads=w.heads,
        max_position_embeddings=w.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        use_sliding_window=False,
    )
    torch.manual_seed(w.seed)
    return Qwen2ForCausalLM(cfg).float()


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]], k: int, temperature: float, max_new_tokens: int,
           eos_id: int, pad_id: int, seed: int, batch_rows: int = 1024) -> list[list[list[int]]]:
    """``[len(prompts)][k]`` response token lists (cut after ``eos_id``, which is kept) from a
    left-padded batched KV-cache decoder. ``temperature == 0``: greedy (k must be 1)."""
    from transformers import DynamicCache

    if temperature == 0 and k != 1:
        raise ValueError("greedy decoding needs k == 1")
    model.eval()
    rows = [list(p) for p in prompts for _ in range(k)]
    gen = torch.Generator().manual_seed(int(seed))
    out: list[list[int]] = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        B, P = len(chunk), max(len(r) for r in chunk)
        ids = torch.full((B, P), pad_id, dtype=torch.long)
        attn = torch.zeros(B, P, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, P - len(r):] = torch.as_tensor(r)
            attn[i, P - len(r):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1]
        done = torch.zeros(B, dtype=torch.bool)
        toks = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
        next_pos = pos[:, -1] + 1
        for t in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float() / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            toks[:, t] = nxt
            done |= nxt == eos_id
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones(B, 1, dtype=torch.long)], dim=-1)
            logits = model(input_ids=nxt.unsqueeze(-1), attention_mask=attn, position_ids=next_pos.unsqueeze(-1),
                           past_key_values=cache, use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
        for i in range(B):
            seq = toks[i].tolist()
            if eos_id in seq:
                seq = seq[: seq.index(eos_id) + 1]
            out.append(seq)
    return [out[i * k:(i + 1) * k] for i in range(len(prompts))]


def evaluate(model, tok, problems: Sequence[ar.Problem], *, samples: int, temperature: float, max_new_tokens: int,
             seed: int, greedy: bool = True, max_slip: int = 3) -> dict:
    """Accuracy on ``problems`` as scored by ``verify_math`` on the decoded responses:
    ``sampled`` (mean over ``samples`` samples at ``temperature``), ``greedy``, and the
    ``diagnose`` breakdown of the sampled responses (fractions)."""
    from actors.prompts import to_token_ids
    from actors.verifiers.math_verifier import verify_math

    prompts = [to_token_ids(p.prompt, tok) for p in problems]
    result: dict[str, Any] = {}
    runs = [("sampled", samples, temperature)] + ([("greedy", 1, 0.0)] if greedy else [])
    for name, k, temp in runs:
        resp = sample(model, prompts, k, temp, max_new_tokens, tok.eos_token_id, tok.pad_token_id, seed)
        correct, kinds = 0, Counter()
        for p, group in zip(problems, resp):
            for r in group:
                text = tok.decode(r, skip_special_tokens=True)
                ok = verify_math(text, str(p.answer)).status == "correct"
                correct += ok
                if name == "sampled":
                    kinds[ar.diagnose(p, text, max_slip)] += 1
        n = len(problems) * k
        result[name] = correct / n
        if name == "sampled":
            result["sampled_breakdown"] = {kind: kinds[kind] / n for kind in ("correct", "slip", "arith", "copy", "format")}
    return result


# ----------------------------------------------------------------------------- training


def _train(task_cfg, warmup_cfg, tok, splits, demos, log_fn: Callable[[str], None]) -> tuple[Any, dict]:
    w = warmup_cfg
    model = build_model(w, tok)
    n_params = sum(p.numel() for p in model.parameters())
    data = [encode_demo(tok, d.problem.prompt, d.response) for d in demos]
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=w.weight_decay, betas=(0.9, 0.98))
    rng = random.Random(f"warmup-batches:{w.seed}")
    order: list[int] = []
    tracker = PlateauTracker(w.patience, w.min_delta)
    dev = splits["dev"]
    eval_kw = dict(samples=w.eval_samples, temperature=w.eval_temperature, max_new_tokens=w.max_new_tokens,
                   max_slip=task_cfg.max_slip)
    best_state, best_step, best_sampled = None, 0, -1.0
    curve, losses = [], []
    t0 = time.monotonic()
    eval_s = 0.0
    trigger: str | None = None  # why the stable phase ended: plateau | max_steps | max_seconds
    cooldown_start = cooldown_end = None
    window: list[float] = []
    step = 0
    while True:
        at_end = cooldown_end is not None and step >= cooldown_end
        if (step > 0 and step % w.eval_every == 0) or at_end:
            te = time.monotonic()
            ev = evaluate(model, tok, dev, seed=w.seed + 1, **eval_kw)
            eval_s += time.monotonic() - te
            improved = tracker.update(ev["sampled"], ev["greedy"])
            point = {"step": step, "seconds": round(time.monotonic() - t0, 1), "lr": opt.param_groups[0]["lr"],
                     "phase": "stable" if cooldown_start is None else "cooldown",
                     "dev_sampled": ev["sampled"], "dev_greedy": ev["greedy"], "dev_breakdown": ev["sampled_breakdown"],
                     "train_loss": round(sum(window) / max(1, len(window)), 4), "improved": improved}
            curve.append(point)
            window = []
            log_fn(f"warm-up step {step} ({point['phase']}): loss {point['train_loss']:.4f} dev sampled "
                   f"{ev['sampled']:.3f} greedy {ev['greedy']:.3f} slip {ev['sampled_breakdown']['slip']:.3f} "
                   f"({point['seconds']:.0f} s{', improved' if improved else ''})")
            if ev["sampled"] > best_sampled:
                best_sampled, best_step = ev["sampled"], step
                best_state = copy.deepcopy(model.state_dict())
            if at_end:
                break
            if cooldown_start is None:
                if step >= w.min_steps and tracker.plateaued:
                    trigger = "plateau"
                elif step >= w.max_steps - w.cooldown_steps:
                    trigger = "max_steps"
                elif time.monotonic() - t0 > w.max_seconds:
                    trigger = "max_seconds"
                if trigger is not None:
                    if w.cooldown_steps == 0:
                        break
                    cooldown_start, cooldown_end = step, step + w.cooldown_steps
                    log_fn(f"warm-up: {trigger} at step {step}; LR cool-down over {w.cooldown_steps} steps")
        lr = w.lr * lr_factor(step, w.lr_warmup_steps, cooldown_start, w.cooldown_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        batch = []
        for _ in range(w.batch_size):
            if not order:
                order = list(range(len(data)))
                rng.shuffle(order)
            batch.append(data[order.pop()])
        input_ids, attn, loss_mask = collate(batch, tok.pad_token_id)
        logits = model(input_ids=input_ids, attention_mask=attn).logits
        loss = response_ce_loss(logits, input_ids, loss_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), w.grad_clip)
        opt.step()
        step += 1
        window.append(loss.item())
        if step % 10 == 0:
            losses.append([step, round(sum(window[-10:]) / len(window[-10:]), 4)])
    train_s = time.monotonic() - t0
    model.load_state_dict(best_state)
    stats = {"params": n_params, "steps": step, "best_step": best_step, "stop_reason": trigger or "max_steps",
             "plateau_step": cooldown_start if cooldown_start is not None else step,
             "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1), "eval_curve": curve,
             "loss_curve": losses, "examples_seen": step * w.batch_size, "epochs": step * w.batch_size / len(data)}
    return model, stats


def _build(entry: Path, task_cfg, warmup_cfg, key: str, log_fn) -> dict:
    from actors.verifiers.math_verifier import verify_math

    t0 = time.monotonic()
    splits = ar.splits_from_config(task_cfg)
    demos = ar.demonstrations(splits["sft"], task_cfg.slip_share, task_cfg.max_slip, task_cfg.digits, task_cfg.seed)
    tok = ar.build_tokenizer()
    # the demonstrations' own accuracy, scored like a model's response (decoded text)
    demo_correct = sum(
        verify_math(tok.decode(tok(d.response, add_special_tokens=False)["input_ids"], skip_special_tokens=True),
                    str(d.problem.answer)).status == "correct" for d in demos)
    model, stats = _train(task_cfg, warmup_cfg, tok, splits, demos, log_fn)
    w = warmup_cfg
    te = time.monotonic()
    held = evaluate(model, tok, splits["heldout"], samples=w.eval_samples, temperature=w.eval_temperature,
                    max_new_tokens=w.max_new_tokens, seed=w.seed + 2, max_slip=task_cfg.max_slip)
    final_eval_s = time.monotonic() - te
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(entry, safe_serialization=True)
    tok.save_pretrained(entry)
    ar.write_prompt_files(entry / "data", splits, names=("train", "dev", "heldout"))
    result = {
        "key": key, "code_version": CODE_VERSION,
        "task": task_cfg.model_dump(mode="json"), "warmup": warmup_cfg.model_dump(mode="json"),
        "heldout_sampled": held["sampled"], "heldout_greedy": held["greedy"],
        "heldout_breakdown": held["sampled_breakdown"],
        "heldout_sampled_if_no_slips": held["sampled_breakdown"]["correct"] + held["sampled_breakdown"]["slip"],
        "eval_samples": w.eval_samples, "eval_temperature": w.eval_temperature,
        "dev_sampled_best": max(p["dev_sampled"] for p in stats["eval_curve"]),
        "slip_share": sum(d.slip is not None for d in demos) / len(demos),
        "demo_accuracy": demo_correct / len(demos),
        "sizes": {k: len(v) for k, v in splits.items()},
        **stats,
        "final_eval_seconds": round(final_eval_s, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    (entry / RESULT_FILE).write_text(json.dumps(result, indent=1))
    log_fn(f"warm-up done: held-out sampled {held['sampled']:.3f} greedy {held['greedy']:.3f} "
           f"({stats['steps']} steps, {stats['stop_reason']}, {result['total_seconds']:.0f} s)")
    return result


def _copy_entry(src: Path, dst: Path) -> None:
    """Copy the entry's files into ``dst`` (created; existing files of the same name replaced)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = dst / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)


def warmup(out_dir: str | os.PathLike | None, task_cfg: Any = None, warmup_cfg: Any = None, *,
           log_fn: Callable[[str], None] | None = None, use_shipped: bool = True) -> dict:
    """Train (or fetch from the cache, or install the shipped entry of the same recipe:
    ``actors.tasks.shipped``) the warm-up model; see the module docstring.

    Returns ``warmup.json``'s content plus ``model_dir`` (``out_dir``, else the cache
    entry), ``cache_dir`` (the entry), ``cached`` (True if nothing was trained), ``shipped``
    (True if the shipped entry was installed) and ``prompt_files`` (``{"train", "dev",
    "heldout"}`` JSONL paths under ``model_dir``)."""
    from actors.tasks import shipped

    task_cfg, warmup_cfg = _sections(task_cfg, warmup_cfg)
    log_fn = log_fn or log.info
    key = cache_key(task_cfg, warmup_cfg)
    root = Path(os.path.expanduser(warmup_cfg.cache_dir))
    entry = root / key
    cached = (entry / RESULT_FILE).is_file()
    ship = shipped.find(key) if use_shipped and not cached else None
    if not cached:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        threads = torch.get_num_threads()
        torch.set_num_threads(warmup_cfg.threads)
        try:
            if ship is not None:
                log_fn(f"warm-up {key}: installing the shipped model {ship} (checksums verified; "
                       f"built by launch/warmup.py --ship, checked by --verify)")
                shipped.install(ship, tmp, task_cfg)
            else:
                log_fn(f"warm-up {key}: training (cache {entry})")
                _build(tmp, task_cfg, warmup_cfg, key, log_fn)
            try:
                os.replace(tmp, entry)  # atomic; fails if another builder got there first
            except OSError:
                if not (entry / RESULT_FILE).is_file():
                    raise
        finally:
            torch.set_num_threads(threads)
            shutil.rmtree(tmp, ignore_errors=True)
    result = json.loads((entry / RESULT_FILE).read_text())
    model_dir = entry
    if out_dir is not None:
        model_dir = Path(out_dir)
        same = (model_dir / RESULT_FILE).is_file() and json.loads((model_dir / RESULT_FILE).read_text()).get("key") == key
        if not same:
            _copy_entry(entry, model_dir)
    result.update(model_dir=str(model_dir), cache_dir=str(entry), cached=cached or ship is not None,
                  shipped=ship is not None,
                  prompt_files={n: str(model_dir / "data" / f"{n}.jsonl") for n in ("train", "dev", "heldout")})
    return result
