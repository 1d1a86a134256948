"""Setup self-check: the stand-in for the main job until the end-to-end launcher exists.

What it proves on this machine, with real components and nothing downloaded:
1. the config loads, validates and is written to the run directory;
2. the CPU build of vLLM starts on a tiny random Qwen2 (written to the run directory),
   samples K responses per prompt with per-token behaviour log-probs, and those log-probs
   agree with a transformers fp32 forward (mean |Δ| < 1e-3);
3. one synchronous PRIME step in plain torch on those responses: PRM forward and online
   cross-entropy update, implicit process rewards, RLOO returns and whitening,
   importance-corrected PPO update of the policy; losses are finite and weights move.
The outcome "verifier" here is a stand-in rule on token ids (the real verifiers are a
separate component); this module is not the trainer and does no asynchrony.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import time
from pathlib import Path

import torch

from common.config import PrimeRunConfig, save_resolved
from learner.logprobs import token_logprobs
from learner.prime import (
    accuracy_filter,
    implicit_process_rewards,
    masked_whiten,
    policy_loss,
    prm_ce_loss,
    rloo_returns,
)

VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_OMP_THREADS_BIND": f"0-{max(0, (os.cpu_count() or 1) - 1)}",
    "VLLM_LOGGING_LEVEL": "WARNING",
}
VOCAB, EOS = 64, 2


def _tiny_model(path: Path, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=EOS,
    )
    model = Qwen2ForCausalLM(cfg).float()
    model.save_pretrained(path)
    return model


def _sample_vllm(model_dir: Path, prompts, k, max_tokens, temperature, seed):
    for key, val in VLLM_CPU_ENV.items():
        os.environ.setdefault(key, val)
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
        max_model_len=256, seed=seed, logprobs_mode="processed_logprobs",
    )
    params = SamplingParams(
        n=k, temperature=temperature, top_p=1.0, max_tokens=max_tokens, logprobs=0,
        seed=seed, detokenize=False,
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    samples = []
    for p, out in zip(prompts, outs):
        for c in out.outputs:
            lps = [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)]
            samples.append((p, list(c.token_ids), lps))
    del llm
    gc.collect()
    return samples


def _sample_torch(model, prompts, k, max_tokens, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    samples = []
    with torch.no_grad():
        for p in prompts:
            for _ in range(k):
                ids, lps = list(p), []
                for _ in range(max_tokens):
                    logits = model(input_ids=torch.tensor([ids])).logits[0, -1] / temperature
                    logp = torch.log_softmax(logits.float(), -1)
                    tok = int(torch.multinomial(logp.exp(), 1, generator=g))
                    ids.append(tok)
                    lps.append(float(logp[tok]))
                    if tok == EOS:
                        break
                samples.append((p, ids[len(p):], lps))
    return samples


def _batch(samples):
    """Right-padded [B, L] input ids, attention mask, response mask and behaviour
    log-probs aligned to the [B, L-1] next-token positions."""
    L = max(len(p) + len(r) for p, r, _ in samples)
    B = len(samples)
    ids = torch.zeros(B, L, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    resp = torch.zeros(B, L - 1)
    behav = torch.zeros(B, L - 1)
    for i, (p, r, lps) in enumerate(samples):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        attn[i, :n] = 1
        resp[i, len(p) - 1 : n - 1] = 1.0
        behav[i, len(p) - 1 : n - 1] = torch.tensor(lps)
    return ids, attn, resp, behav


def run_selfcheck(cfg: PrimeRunConfig, run_dir: str | Path, use_vllm: bool = True) -> dict:
    """Run the checks above; returns (and writes to ``<run_dir>/selfcheck.json``) the
    measured numbers. Raises AssertionError when a check fails."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg_path = save_resolved(cfg, run_dir)
    torch.manual_seed(cfg.run.seed)
    k = max(2, min(cfg.generation.k, 4))
    temp = cfg.generation.temperature
    policy = _tiny_model(run_dir / "selfcheck-model", cfg.run.seed)
    prompts = [[1, 10, 11, 12], [1, 20, 21], [1, 30, 31, 32, 33]]

    t0 = time.perf_counter()
    sampler = _sample_vllm if use_vllm else _sample_torch
    target = run_dir / "selfcheck-model" if use_vllm else policy
    samples = sampler(target, prompts, k, 12, temp, cfg.run.seed)
    gen_s = time.perf_counter() - t0

    ids, attn, mask, behav = _batch(samples)
    # stand-in outcome: 1 if the response uses more even than odd token ids
    outcome = torch.tensor([float(sum(t % 2 == 0 for t in r) > len(r) / 2) for _, r, _ in samples])

    prm, ref = copy.deepcopy(policy), copy.deepcopy(policy)
    ref.requires_grad_(False)
    with torch.no_grad():
        old = token_logprobs(policy, ids, attn, temp)
        ref_lp = token_logprobs(ref, ids, attn, temp)
    engine_diff = float(((old - behav).abs() * mask).sum() / mask.sum())
    assert engine_diff < 1e-3, f"engine and learner log-probs differ: mean |Δ| = {engine_diff:.2e}"

    # PRM: single forward, rewards from the pre-update PRM ("after"), then one CE step
    prm_opt = torch.optim.AdamW(prm.parameters(), lr=1e-3, weight_decay=0.0)
    prm_lp = token_logprobs(prm, ids, attn, 1.0)
    q = implicit_process_rewards(prm_lp.detach(), ref_lp, mask)
    ce = prm_ce_loss(prm_lp, ref_lp, mask, outcome, cfg.prime.beta)
    ce.backward()
    prm_opt.step()
    ce = ce.detach()
    with torch.no_grad():
        ce_after = float(prm_ce_loss(token_logprobs(prm, ids, attn, 1.0), ref_lp, mask, outcome, cfg.prime.beta))

    returns = rloo_returns(
        q, outcome, mask, k, process_baseline=cfg.prime.process_baseline, prime_norm=cfg.prime.prime_norm,
        gamma=cfg.prime.gamma,
    )
    adv = masked_whiten(returns, mask)
    kept = accuracy_filter(outcome, k, cfg.prime.filter_low, cfg.prime.filter_high)

    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    logp = token_logprobs(policy, ids, attn, temp)
    loss, m = policy_loss(
        logp, old, behav, adv, mask, clip_eps=cfg.loss.clip_eps, correction=cfg.loss.correction,
        is_cap=cfg.loss.is_cap, is_low=cfg.loss.is_low, is_high=cfg.loss.is_high,
    )
    loss.backward()
    loss = loss.detach()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.policy.grad_clip)
    opt.step()
    moved = sum(float((a - b.detach()).abs().sum()) for a, b in zip(before, policy.parameters()))
    assert torch.isfinite(loss) and torch.isfinite(ce), "non-finite loss"
    assert moved > 0, "policy weights did not change"
    assert ce_after < float(ce), f"PRM CE did not decrease ({float(ce):.4f} -> {ce_after:.4f})"

    result = {
        "config": str(cfg_path),
        "engine": "vllm" if use_vllm else "torch",
        "responses": len(samples),
        "response_tokens": int(mask.sum()),
        "generation_s": round(gen_s, 2),
        "engine_vs_learner_logp_mean_abs_diff": engine_diff,
        "outcome_mean": float(outcome.mean()),
        "groups_kept_by_filter": int(kept.sum()),
        "prm_ce_before": float(ce),
        "prm_ce_after": ce_after,
        "policy_loss": float(loss),
        "clip_frac": float(m["clip_frac"]),
        "mismatch_kl": float(m["mismatch_kl"]),
        "policy_weight_change_l1": moved,
        "total_s": round(time.perf_counter() - t_start, 2),
    }
    (run_dir / "selfcheck.json").write_text(json.dumps(result, indent=2))
    return result
