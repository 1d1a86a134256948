"""One PRIME step on every learner rank.

Contract
--------
- Called on every rank of the learner's process group with that rank's share of the
  step's batch: the step's groups in a fixed global order, rank r holding groups
  r, r+W, r+2W, ... (``shard_groups``). Mini-batch j is global groups [j·G, (j+1)·G);
  each rank trains on its part of it, so the update does not depend on the world size
  (1-rank and W-rank runs agree up to float summation order).
- Batch-level statistics (prime_norm's max, RLOO groups, whitening) need the whole
  batch: the process rewards are all-gathered, the pure functions of ``learner/prime.py``
  run on the full batch on every rank, and each rank keeps its rows. Losses are sums
  divided by the global mini-batch size, times W to undo the gradient averaging of DDP
  and of FSDP2's reduce-scatter alike.
- Models are plain modules, DDP-wrapped, or FSDP2-sharded (``is_sharded``; the trainer
  decides). DDP all-reduces once per optimiser step (``no_sync`` on all but the last
  micro-batch). FSDP2 runs collectives inside every forward (all-gather) and backward
  (reduce-scatter), so every rank must make the same sequence of forward/backward calls:
  the micro-batch count of each forward pass (``batch_logprobs``) and of each mini-batch
  update is all-reduced to its maximum and the shorter ranks pad with dummy micro-batches
  (a 1-token forward whose loss is multiplied by 0: exactly zero gradient), so the update
  equals the DDP one up to float summation order. FSDP2 reduce-scatters the gradients of
  every micro-batch (no gradient-sync skipping: the unsharded gradients are never held).
  Gradient clipping uses ``clip_grad_norm_``, which reduces DTensor (sharded) gradients
  across ranks, so the clipped norm is the global one in both modes.
- Every rank must hold the same number of groups (so the same number of mini-batches).
- Order (paper §3-§5): reference forward -> PRM forward + cross-entropy update
  (``prm_update``: after | before | none) -> process rewards -> returns/advantages ->
  π_old recomputed when ``loss.correction`` is not ``none`` -> policy mini-batch updates
  with gradient clipping. The caller bumps ``policy_version`` and broadcasts weights.
- Precision (``compute_dtype``): with ``model.dtype`` bfloat16/float16 and float32
  ``model.master_dtype``, the trainable models hold fp32 parameters (masters), gradients and
  optimiser state; plain/DDP forwards run under ``torch.autocast(dtype)``, FSDP2 modules
  cast through their ``MixedPrecisionPolicy`` instead. Log-softmax, losses and all
  statistics are float32.
Not covered: ingest/filtering/staleness (rank 0's job), wrapping/sharding the models,
weight broadcast, checkpoints (``learner.trainer``).
"""

from __future__ import annotations

import time

import torch
from torch.distributed.tensor import DTensor

from common.config import PrimeRunConfig
from learner.distributed import all_gather_rows, all_reduce, dummy_forward, is_sharded, no_sync, pad_count, world
from learner.logprobs import token_logprobs
from learner.models import Models, compute_dtype
from learner.packing import bins, pack_ffd
from learner.prime import (
    grpo_returns,
    implicit_process_rewards,
    kl_to_reference,
    masked_mean,
    masked_whiten,
    policy_loss,
    prm_ce_loss,
    regularised_loss,
    reinforce_returns,
    rloo_returns,
)
from learner.rollout import RolloutBatch


# π_old from forwards the step runs anyway (the first mini-batch's policy forward; the
# reference forward when model.ref = policy_old at temperature 1) instead of its own pass.
# Tests turn it off to compare against the full recomputation.
REUSE_FORWARDS = True


def _micro_batches(batch: RolloutBatch, budget_tokens: int) -> list[list[int]]:
    """Row indices per micro-batch: first-fit decreasing on sequence length, each bin's
    padded size (rows × longest) kept near the token budget."""
    lengths = batch.seq_lengths().numpy()
    budget = max(int(budget_tokens), int(lengths.max()))
    return bins(pack_ffd(lengths, budget))


def _clock(like: torch.Tensor) -> float:
    """time.perf_counter() after the device holding ``like`` has finished its queued work
    (CUDA kernels run asynchronously; without the sync a phase's time spills into the next)."""
    if like.is_cuda:
        torch.cuda.synchronize(like.device)
    return time.perf_counter()


@torch.no_grad()
def batch_logprobs(model, batch: RolloutBatch, temperature: float, budget_tokens: int,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, L-1] log-probs of every next token, micro-batched, no grad; forwards autocast
    to ``compute_dtype`` (see ``learner.logprobs.compute_context``)."""
    out = torch.zeros_like(batch.mask)
    mbs = _micro_batches(batch, budget_tokens)
    pad = pad_count(model, len(mbs))  # FSDP2: match the other ranks' forwards
    for rows in mbs:
        sub = batch.take(rows)
        lp = token_logprobs(model, sub.input_ids, sub.attention_mask, temperature, compute_dtype)
        out[rows, : lp.shape[1]] = lp
    for _ in range(pad):
        dummy_forward(model, batch.input_ids)
    return out


def _mini_batches(local_groups: int, groups_per_mb_local: int) -> list[list[int]]:
    return [list(range(s, min(s + groups_per_mb_local, local_groups))) for s in range(0, local_groups, groups_per_mb_local)]


def optimizer_steps(opt) -> int:
    """Optimiser steps ``opt`` has taken (AdamW's per-parameter ``step``; 0 when fresh).
    It lives in the optimiser state, so checkpoints carry it."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st and "step" in st:
                return int(st["step"])
    return 0


def warmup_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up: step n (from 0) uses base_lr · min(1, (n + 1) / warmup_steps);
    ``warmup_steps`` 0 = base_lr throughout."""
    return base_lr if warmup_steps <= 0 else base_lr * min(1.0, (step + 1) / warmup_steps)


def _train_minibatch(model, opt, sub: RolloutBatch, loss_fn, normalizer, grad_clip, budget, W, ocfg=None):
    """Accumulate grads over micro-batches of ``sub``; one optimiser step, at the learning
    rate of ``ocfg``'s warm-up (``optim.*``) when given. Returns (loss sum, grad norm,
    per-row outputs of loss_fn's second value)."""
    if ocfg is not None:
        lr = warmup_lr(ocfg.lr, optimizer_steps(opt), ocfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    mbs = _micro_batches(sub, budget)
    # FSDP2: every rank runs the same number of forward/backward pairs (at least one, so
    # gradients exist like DDP's zero-gradient backward below); pads contribute exactly 0
    pad = pad_count(model, len(mbs), at_least=1)
    total = 0.0
    extras = []
    for i, rows in enumerate(mbs):
        micro = sub.take(rows)
        with no_sync(model, last=i == len(mbs) - 1):
            loss, extra = loss_fn(model, micro, rows, normalizer)
            (loss * W).backward()
        total += float(loss.detach())
        extras.append((rows, extra))
    for _ in range(pad):
        (dummy_forward(model, sub.input_ids) * 0.0 * W).backward()
    if not mbs and not is_sharded(model):  # an empty share still joins DDP's all-reduce
        (sum(p.sum() * 0 for p in model.parameters()) * W).backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if isinstance(gnorm, DTensor):  # FSDP2: the global norm, replicated on every rank
        gnorm = gnorm.full_tensor()
    opt.step()
    return total, float(gnorm), extras


def prime_step(models: Models, batch: RolloutBatch, cfg: PrimeRunConfig, policy_version: int) -> dict[str, float]:
    """Run one PRIME step on this rank's share ``batch``; returns metrics (global where
    they are reduced, i.e. identical on every rank)."""
    rank, W = world()
    t0 = _clock(batch.mask)
    K = batch.group_size
    temp = cfg.generation.temperature
    budget = cfg.batch.micro_batch_tokens
    pc = cfg.prime
    mask = batch.mask
    G_local = batch.num_groups
    cdt = compute_dtype(cfg)
    m: dict[str, float] = {}

    def per_rank_groups(responses: int) -> int:
        g = responses // K
        if g % W:
            raise ValueError(f"mini-batch of {g} groups does not split over {W} ranks")
        return g // W

    # ---------------------------------------------------------------- PRM and rewards
    use_prm = pc.use_process_rewards and models.prm is not None
    q = None
    if use_prm:
        if models.ref is not None:
            ref_lp = batch_logprobs(models.ref, batch, 1.0, budget, cdt)
        else:  # ref = π_old at temperature 1
            ref_lp = batch_logprobs(models.policy, batch, 1.0, budget, cdt)
        q = torch.zeros_like(mask)
        prm_losses = []

        def prm_loss(model, micro, rows, normalizer, sub_ref):
            lp = token_logprobs(model, micro.input_ids, micro.attention_mask, 1.0, cdt)
            r = sub_ref[rows][:, : lp.shape[1]]
            loss = prm_ce_loss(lp, r, micro.mask, micro.outcome, pc.beta, normalizer=normalizer)
            return loss, implicit_process_rewards(lp.detach(), r, micro.mask)

        if pc.prm_update in ("after", "before"):
            gl = per_rank_groups(cfg.batch.prm_mini_batch)
            for groups in _mini_batches(G_local, gl):
                rows = [g * K + k for g in groups for k in range(K)]
                sub = batch.take(rows)
                sub_ref = ref_lp[rows][:, : sub.mask.shape[1]]
                loss, _, extras = _train_minibatch(
                    models.prm, models.prm_opt, sub,
                    lambda mo, mi, r, n: prm_loss(mo, mi, r, n, sub_ref),
                    normalizer=float(cfg.batch.prm_mini_batch), grad_clip=cfg.optim.prm.grad_clip,
                    budget=budget, W=W, ocfg=cfg.optim.prm,
                )
                prm_losses.append(loss)
                for mrows, qq in extras:  # "after": rewards from the forward that trained
                    idx = torch.as_tensor(rows)[mrows]
                    q[idx, : qq.shape[1]] = qq
        if pc.prm_update in ("before", "none"):
            q = implicit_process_rewards(batch_logprobs(models.prm, batch, 1.0, budget, cdt), ref_lp, mask)
        if prm_losses:
            m["loss/prm_ce"] = float(all_reduce(torch.tensor(sum(prm_losses) / len(prm_losses))) )
    t_prm = _clock(batch.mask)

    # ------------------------------------------------------- returns and advantages
    mask_all = all_gather_rows(mask)
    outcome_all = all_gather_rows(batch.outcome[:, None])[:, 0]
    q_all = all_gather_rows(q) if q is not None else None
    if q_all is not None:
        q_all = q_all[:, : mask_all.shape[1]]
    kw = dict(prime_norm=pc.prime_norm, gamma=pc.gamma, process_credit=pc.process_credit, process_gamma=pc.process_gamma)
    if pc.advantage == "rloo":
        returns = rloo_returns(q_all, outcome_all, mask_all, K, process_baseline=pc.process_baseline, **kw)
    elif pc.advantage == "grpo":
        returns = grpo_returns(q_all, outcome_all, mask_all, K, **kw)
    else:
        returns = reinforce_returns(q_all, outcome_all, mask_all, **kw)
    adv_all = masked_whiten(returns, mask_all) * mask_all
    B_local = batch.num_rows
    adv = adv_all[rank * B_local : (rank + 1) * B_local][:, : mask.shape[1]]

    # ------------------------------------------------------------------- π_old
    # Every correction but none weighs by π_old/μ, so π_old is recomputed, except where a
    # forward already gives it: the first mini-batch's policy forward runs at θ = π_old (its
    # rows are filled from that forward in pol_loss), and with model.ref=policy_old at
    # temperature 1 the reference forward above was π_old itself.
    gl = per_rank_groups(cfg.batch.policy_mini_batch)
    mini = [torch.as_tensor([g * K + k for g in groups for k in range(K)]) for groups in _mini_batches(G_local, gl)]
    first_from_policy = cfg.loss.correction != "none" and REUSE_FORWARDS
    if cfg.loss.correction == "none":
        old_lp = batch.behav_logp
    elif use_prm and models.ref is None and temp == 1.0 and REUSE_FORWARDS:
        old_lp, first_from_policy = ref_lp, False
    else:
        old_lp = torch.zeros_like(mask)
        rest = (torch.cat(mini[1:]) if len(mini) > 1 else torch.zeros(0, dtype=torch.long)) if first_from_policy \
            else torch.arange(batch.num_rows)
        if len(rest):
            sub = batch.take(rest)
            old_lp[rest, : sub.mask.shape[1]] = batch_logprobs(models.policy, sub, temp, budget, cdt)
        else:  # FSDP2: this rank's forward count still matches the other ranks'
            with torch.no_grad():
                for _ in range(pad_count(models.policy, 0)):
                    dummy_forward(models.policy, batch.input_ids)
    t_old = _clock(batch.mask)

    # ---------------------------------------------------- reference log-probs (KL)
    lc = cfg.loss
    ref_pol_lp = None  # log π_ref at the sampling temperature: the KL penalty and its metrics
    if models.ref is not None:
        ref_pol_lp = ref_lp if (use_prm and temp == 1.0) else batch_logprobs(models.ref, batch, temp, budget, cdt)

    # ----------------------------------------------------------------- policy update
    pol_losses, gnorms, pm = [], [], []

    def pol_loss(model, micro, rows, normalizer, sub_idx, at_old):
        lp, ent = token_logprobs(model, micro.input_ids, micro.attention_mask, temp, cdt, with_entropy=True,
                                 entropy_grad=lc.entropy_coef > 0)
        T = lp.shape[1]
        idx = sub_idx[rows]
        if at_old:  # θ has not moved yet in this step: this forward is π_old
            old_lp[idx, :T] = lp.detach()
        loss, met = policy_loss(
            lp, old_lp[idx][:, :T], batch.behav_logp[idx][:, :T], adv[idx][:, :T], micro.mask,
            clip_eps=lc.clip_eps, correction=lc.correction, is_cap=lc.is_cap, normalizer=normalizer,
            is_low=lc.is_low, is_high=lc.is_high,
        )
        kl = None
        if ref_pol_lp is not None:
            r = ref_pol_lp[idx][:, :T]
            est = {e: kl_to_reference(lp, r, micro.mask, e) for e in ("k1", "k3")}
            kl = est[lc.kl_estimator]
            met["kl_k1"], met["kl_k3"] = (masked_mean(est[e].detach(), micro.mask) for e in ("k1", "k3"))
        met["entropy"] = masked_mean(ent.detach(), micro.mask)
        loss = regularised_loss(loss, kl, ent, micro.mask, lc.kl_coef, lc.entropy_coef, normalizer=normalizer)
        return loss, (met, float(micro.mask.sum()))

    for epoch in range(cfg.batch.ppo_epochs):
        for j, rows in enumerate(mini):
            sub = batch.take(rows)
            n_tok = all_reduce(sub.mask.sum().clone())
            at_old = first_from_policy and epoch == 0 and j == 0
            loss, gn, extras = _train_minibatch(
                models.policy, models.policy_opt, sub,
                lambda mo, mi, r, n, rows=rows, at_old=at_old: pol_loss(mo, mi, r, n, rows, at_old),
                normalizer=float(n_tok), grad_clip=cfg.optim.policy.grad_clip, budget=budget, W=W,
                ocfg=cfg.optim.policy,
            )
            pol_losses.append(loss)
            gnorms.append(gn)
            pm.extend(e for _, e in extras)
    t_pol = _clock(batch.mask)

    # ------------------------------------------------------------------- metrics
    tok = float(mask.sum())
    stats = torch.zeros(12, dtype=torch.float64)
    stats[0] = sum(pol_losses)
    for met, n in pm:  # token-weighted sums of the policy-loss metrics
        stats[1] += float(met["clip_frac"]) * n
        stats[2] += float(met["is_weight_mean"]) * n
        stats[3] += float(met["mismatch_kl"]) * n
        stats[4] += float(met["is_masked_frac"]) * n
        stats[8] += float(met.get("is_capped_frac", 0.0)) * n
        stats[9] += float(met.get("kl_k1", 0.0)) * n
        stats[10] += float(met.get("kl_k3", 0.0)) * n
        stats[11] += float(met["entropy"]) * n
        stats[5] += n
    stats[6] = tok
    stats[7] = float(batch.outcome.sum())
    all_reduce(stats)
    n_pm = max(float(stats[5]), 1.0)
    nb = max(len(pol_losses), 1)
    m["loss/policy"] = float(stats[0]) / nb
    m["loss/clip_frac"] = float(stats[1]) / n_pm
    m["loss/is_weight_mean"] = float(stats[2]) / n_pm
    m["loss/mismatch_kl"] = float(stats[3]) / n_pm
    m["loss/is_masked_frac"] = float(stats[4]) / n_pm
    m["loss/is_capped_frac"] = float(stats[8]) / n_pm
    m["loss/grad_norm"] = sum(gnorms) / max(len(gnorms), 1)
    m["loss/entropy"] = float(stats[11]) / n_pm
    if ref_pol_lp is not None:
        m["loss/kl_k1"], m["loss/kl_k3"] = float(stats[9]) / n_pm, float(stats[10]) / n_pm
    m["optim/policy_lr"] = models.policy_opt.param_groups[0]["lr"]
    m["reward/outcome_mean"] = float(stats[7]) / (batch.num_rows * W)
    on = mask_all > 0
    m["reward/advantage_mean"] = float(adv_all[on].mean())
    m["reward/advantage_std"] = float(adv_all[on].std()) if on.sum() > 1 else 0.0
    m["reward/return_mean"] = float(returns[on].mean())
    if q_all is not None:
        seq = pc.beta * q_all.sum(-1)  # β Σ_t q_t, the PRM's sequence score
        m["reward/process_mean"] = float(seq.mean())
        label = outcome_all > 0.5
        m["prm/accuracy"] = float(((seq > 0) == label).float().mean())
    lag_all = all_gather_rows(torch.where(mask > 0, policy_version - batch.token_version, -1).float())
    lags = lag_all[lag_all >= 0]
    if lags.numel():
        m["system/version_lag_min"], m["system/version_lag_mean"], m["system/version_lag_max"] = (
            float(lags.min()), float(lags.mean()), float(lags.max()))
    m["system/tokens"] = float(stats[6])
    m["time/prm_s"] = t_prm - t0
    m["time/old_logp_s"] = t_old - t_prm
    m["time/policy_s"] = t_pol - t_old
    return m


__all__ = ["prime_step", "batch_logprobs", "optimizer_steps", "warmup_lr"]
