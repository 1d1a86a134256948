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
- Order (paper §3-§5), one function per phase: ``prm_phase`` (reference forward, PRM
  forward + cross-entropy update, ``prm_update``: after | before | none, process rewards)
  -> ``advantage_phase`` (returns, whitening) -> ``old_logp_phase`` (π_old, recomputed when
  ``loss.correction`` is not ``none``) -> ``reference_logp_phase`` (the KL's log π_ref) ->
  ``policy_phase`` (mini-batch updates with gradient clipping, sums in ``PolicyStats``) ->
  ``step_metrics``. The caller bumps ``policy_version`` and broadcasts weights.
- ``placement.prm_thread`` (``learner.side_thread``): the reference forward runs on a
  second thread beside the PRM's forward, and with ``prm_update: after`` the last PRM
  mini-batch's backward and optimiser step run there beside the advantage, π_old and
  policy phases; the step waits for them before ``step_metrics`` (``time/prm_wait_s``), so
  its results are the sequential ones exactly. ``time/prm_s`` is then the time until the
  process rewards exist, not the PRM's whole work.
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
from concurrent.futures import Future
from dataclasses import dataclass, field

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
from learner.side_thread import done, overlap_ok, side_executor, wait


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


def _train_minibatch(model, opt, sub: RolloutBatch, loss_fn, normalizer, grad_clip, budget, W, ocfg=None,
                     side=None):
    """Accumulate grads over micro-batches of ``sub``; one optimiser step, at the learning
    rate of ``ocfg``'s warm-up (``optim.*``) when given. Returns (loss sum, grad norm,
    per-row outputs of loss_fn's second value).

    ``side`` (``learner.side_thread``; plain or DDP modules only): the backward passes and
    the clipping + optimiser step run on that thread, each forward here waiting for the
    previous backward; the grad norm is then a Future, and the update is done when it is."""
    if ocfg is not None:
        lr = warmup_lr(ocfg.lr, optimizer_steps(opt), ocfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    mbs = _micro_batches(sub, budget)
    # FSDP2: every rank runs the same number of forward/backward pairs (at least one, so
    # gradients exist like DDP's zero-gradient backward below); pads contribute exactly 0
    pad = pad_count(model, len(mbs), at_least=1)
    total, extras, pending = 0.0, [], None
    for i, rows in enumerate(mbs):
        micro = sub.take(rows)
        wait(pending)  # DDP: a forward must not prepare the reducer while a backward runs
        with no_sync(model, last=i == len(mbs) - 1):  # DDP decides at forward time whether to sync
            loss, extra = loss_fn(model, micro, rows, normalizer)
            if side is None:
                (loss * W).backward()
            else:
                pending = side.submit(lambda t=loss * W: t.backward())
        total += float(loss.detach())
        extras.append((rows, extra))
    for _ in range(pad):
        (dummy_forward(model, sub.input_ids) * 0.0 * W).backward()
    if not mbs and not is_sharded(model):  # an empty share still joins DDP's all-reduce
        zero = lambda: (sum(p.sum() * 0 for p in model.parameters()) * W).backward()  # noqa: E731
        pending = side.submit(zero) if side is not None else zero()

    def finish(prev=pending):
        wait(prev)  # a failed backward fails the update instead of stepping on partial grads
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if isinstance(gnorm, DTensor):  # FSDP2: the global norm, replicated on every rank
            gnorm = gnorm.full_tensor()
        opt.step()
        return float(gnorm)

    return total, (side.submit(finish) if side is not None else finish()), extras


@dataclass(frozen=True)
class _Ctx:
    """What every phase of one step reads."""

    cfg: PrimeRunConfig
    K: int                       # responses per group
    temp: float                  # sampling temperature (the policy's forwards)
    budget: int                  # micro-batch token budget
    cdt: torch.dtype | None      # autocast dtype (compute_dtype)
    rank: int
    W: int                       # world size
    use_prm: bool
    overlap: bool = False        # PRM work on the side thread (learner.side_thread)

    def per_rank_groups(self, responses: int) -> int:
        """Groups of a mini-batch of ``responses`` responses that this rank trains on."""
        g = responses // self.K
        if g % self.W:
            raise ValueError(f"mini-batch of {g} groups does not split over {self.W} ranks")
        return g // self.W

    def rows_of(self, groups) -> list[int]:
        return [g * self.K + k for g in groups for k in range(self.K)]


@dataclass
class PrmOut:
    ref_lp: torch.Tensor | None      # [B, T] log π_ref at temperature 1 (None without the PRM)
    q: torch.Tensor | None           # [B, T] implicit process rewards (None without the PRM)
    ce_loss: float | None = None     # mean PRM cross-entropy over its mini-batches, all ranks
    pending: Future | None = None    # the PRM's last optimiser step, still running on the side thread


@dataclass
class Advantages:
    adv: torch.Tensor                # [B, T] this rank's whitened advantages
    adv_all: torch.Tensor            # [B·W, T*] every rank's rows
    returns: torch.Tensor            # [B·W, T*] before whitening
    mask_all: torch.Tensor           # [B·W, T*]
    outcome_all: torch.Tensor        # [B·W]
    q_all: torch.Tensor | None       # [B·W, T*]


@dataclass
class PolicyStats:
    """The policy phase's sums over this rank's micro-batches: the ``loss/*`` metrics
    weighted by the micro-batch's tokens (``weight``), the losses and grad norms per
    mini-batch. ``SUMMED`` fields are all-reduced across ranks together (``reduce``)."""

    SUMMED = ("loss_sum", "clip_frac", "is_weight_mean", "mismatch_kl", "is_masked_frac", "weight", "tokens",
              "outcome_sum", "is_capped_frac", "kl_k1", "kl_k3", "entropy")
    loss_sum: float = 0.0
    clip_frac: float = 0.0
    is_weight_mean: float = 0.0
    mismatch_kl: float = 0.0
    is_masked_frac: float = 0.0
    weight: float = 0.0            # tokens behind the weighted sums [tokens]
    tokens: float = 0.0            # this rank's response tokens [tokens]
    outcome_sum: float = 0.0
    is_capped_frac: float = 0.0
    kl_k1: float = 0.0
    kl_k3: float = 0.0
    entropy: float = 0.0
    minibatches: int = 0
    grad_norms: list = field(default_factory=list)

    def add(self, met: dict, n: float) -> None:
        """One micro-batch's ``policy_loss`` metrics, ``n`` tokens."""
        self.clip_frac += float(met["clip_frac"]) * n
        self.is_weight_mean += float(met["is_weight_mean"]) * n
        self.mismatch_kl += float(met["mismatch_kl"]) * n
        self.is_masked_frac += float(met["is_masked_frac"]) * n
        self.is_capped_frac += float(met.get("is_capped_frac", 0.0)) * n
        self.kl_k1 += float(met.get("kl_k1", 0.0)) * n
        self.kl_k3 += float(met.get("kl_k3", 0.0)) * n
        self.entropy += float(met["entropy"]) * n
        self.weight += n

    def reduce(self) -> "PolicyStats":
        """The ``SUMMED`` fields summed over ranks (one float64 all-reduce), in place."""
        t = torch.tensor([getattr(self, f) for f in self.SUMMED], dtype=torch.float64)
        all_reduce(t)
        for f, v in zip(self.SUMMED, t.tolist()):
            setattr(self, f, v)
        return self


def prime_step(models: Models, batch: RolloutBatch, cfg: PrimeRunConfig, policy_version: int) -> dict[str, float]:
    """Run one PRIME step on this rank's share ``batch``; returns metrics (global where
    they are reduced, i.e. identical on every rank). The phases, in the paper's order:
    PRM (reference forward, PRM update, process rewards) -> advantages -> π_old ->
    reference log-probs for the KL -> policy update -> metrics."""
    rank, W = world()
    use_prm = cfg.prime.use_process_rewards and models.prm is not None
    ctx = _Ctx(cfg, batch.group_size, cfg.generation.temperature, cfg.batch.micro_batch_tokens,
               compute_dtype(cfg), rank, W, use_prm, use_prm and overlap_ok(models, cfg.placement.prm_thread))
    t0 = _clock(batch.mask)
    prm = prm_phase(models, batch, ctx)
    try:
        t_prm = _clock(batch.mask)
        adv = advantage_phase(batch, prm.q, ctx)
        gl = ctx.per_rank_groups(cfg.batch.policy_mini_batch)
        mini = [torch.as_tensor(ctx.rows_of(groups)) for groups in _mini_batches(batch.num_groups, gl)]
        old_lp, first_from_policy = old_logp_phase(models, batch, prm, mini, ctx)
        t_old = _clock(batch.mask)
        ref_pol_lp = reference_logp_phase(models, batch, prm, ctx)
        stats = policy_phase(models, batch, adv.adv, old_lp, ref_pol_lp, mini, first_from_policy, ctx)
        t_pol = _clock(batch.mask)
    finally:  # the PRM's update is part of this step, whatever happened meanwhile
        wait(prm.pending)
    t_wait = _clock(batch.mask)
    m = step_metrics(models, batch, prm, adv, stats, ref_pol_lp is not None, policy_version, ctx)
    m["time/prm_s"] = t_prm - t0
    m["time/old_logp_s"] = t_old - t_prm
    m["time/policy_s"] = t_pol - t_old
    m["time/prm_wait_s"] = t_wait - t_pol
    return m


def prm_phase(models: Models, batch: RolloutBatch, ctx: _Ctx) -> PrmOut:
    """The reference forward, the PRM's cross-entropy update (``prime.prm_update``: after |
    before | none) and the implicit process rewards q (Eq. 3): with ``after`` they come from
    the forwards that trained the PRM, otherwise from a forward of the (updated) PRM.

    With ``ctx.overlap`` the reference forward runs on the side thread beside the PRM's first
    forward, and with ``after`` the last mini-batch's backward and optimiser step stay there
    when this returns (``PrmOut.pending``; ``prime_step`` waits for it at its end)."""
    if not ctx.use_prm:
        return PrmOut(None, None)
    cfg, pc, budget, cdt = ctx.cfg, ctx.cfg.prime, ctx.budget, ctx.cdt
    side = side_executor() if ctx.overlap else None
    ref_model = models.ref if models.ref is not None else models.policy  # ref = π_old at temperature 1
    ref_job = (side.submit(batch_logprobs, ref_model, batch, 1.0, budget, cdt) if side is not None
               else done(batch_logprobs(ref_model, batch, 1.0, budget, cdt)))
    q = torch.zeros_like(batch.mask)
    prm_losses, pending = [], None

    def prm_loss(model, micro, rows, normalizer, sub_rows):
        lp = token_logprobs(model, micro.input_ids, micro.attention_mask, 1.0, cdt)
        r = wait(ref_job)[torch.as_tensor(sub_rows)[rows]][:, : lp.shape[1]]
        loss = prm_ce_loss(lp, r, micro.mask, micro.outcome, pc.beta, normalizer=normalizer)
        return loss, implicit_process_rewards(lp.detach(), r, micro.mask)

    if pc.prm_update in ("after", "before"):
        prm_mbs = _mini_batches(batch.num_groups, ctx.per_rank_groups(cfg.batch.prm_mini_batch))
        for j, groups in enumerate(prm_mbs):
            rows = ctx.rows_of(groups)
            sub = batch.take(rows)
            loss, gnorm, extras = _train_minibatch(
                models.prm, models.prm_opt, sub,
                lambda mo, mi, r, n, rows=rows: prm_loss(mo, mi, r, n, rows),
                normalizer=float(cfg.batch.prm_mini_batch), grad_clip=cfg.optim.prm.grad_clip,
                budget=budget, W=ctx.W, ocfg=cfg.optim.prm,
                # only the last update can trail: every earlier one is read by the next forward
                side=side if pc.prm_update == "after" and j == len(prm_mbs) - 1 else None,
            )
            pending = gnorm if isinstance(gnorm, Future) else None
            prm_losses.append(loss)
            for mrows, qq in extras:  # "after": rewards from the forward that trained
                idx = torch.as_tensor(rows)[mrows]
                q[idx, : qq.shape[1]] = qq
    if pc.prm_update in ("before", "none"):
        q = implicit_process_rewards(batch_logprobs(models.prm, batch, 1.0, budget, cdt), wait(ref_job), batch.mask)
    ce = float(all_reduce(torch.tensor(sum(prm_losses) / len(prm_losses)))) if prm_losses else None
    return PrmOut(wait(ref_job), q, ce, pending)


def advantage_phase(batch: RolloutBatch, q: torch.Tensor | None, ctx: _Ctx) -> Advantages:
    """Returns of the configured estimator (``prime.advantage``) over the whole batch (every
    rank's rows, gathered: the statistics are batch-level), whitened; this rank keeps its rows."""
    pc = ctx.cfg.prime
    mask = batch.mask
    mask_all = all_gather_rows(mask)
    outcome_all = all_gather_rows(batch.outcome[:, None])[:, 0]
    q_all = all_gather_rows(q) if q is not None else None
    if q_all is not None:
        q_all = q_all[:, : mask_all.shape[1]]
    kw = dict(prime_norm=pc.prime_norm, gamma=pc.gamma, process_credit=pc.process_credit, process_gamma=pc.process_gamma)
    if pc.advantage == "rloo":
        returns = rloo_returns(q_all, outcome_all, mask_all, ctx.K, process_baseline=pc.process_baseline, **kw)
    elif pc.advantage == "grpo":
        returns = grpo_returns(q_all, outcome_all, mask_all, ctx.K, **kw)
    else:
        returns = reinforce_returns(q_all, outcome_all, mask_all, **kw)
    adv_all = masked_whiten(returns, mask_all) * mask_all
    B_local = batch.num_rows
    adv = adv_all[ctx.rank * B_local : (ctx.rank + 1) * B_local][:, : mask.shape[1]]
    return Advantages(adv, adv_all, returns, mask_all, outcome_all, q_all)


def old_logp_phase(models: Models, batch: RolloutBatch, prm: PrmOut, mini: list[torch.Tensor],
                   ctx: _Ctx) -> tuple[torch.Tensor, bool]:
    """π_old [B, T] and whether the first mini-batch's policy forward fills its rows.

    Every correction but none weighs by π_old/μ, so π_old is recomputed, except where a
    forward already gives it: the first mini-batch's policy forward runs at θ = π_old (its
    rows are filled from that forward in the policy phase), and with model.ref=policy_old at
    temperature 1 the reference forward of the PRM phase was π_old itself."""
    correction = ctx.cfg.loss.correction
    first_from_policy = correction != "none" and REUSE_FORWARDS
    if correction == "none":
        return batch.behav_logp, first_from_policy
    if ctx.use_prm and models.ref is None and ctx.temp == 1.0 and REUSE_FORWARDS:
        return prm.ref_lp, False
    old_lp = torch.zeros_like(batch.mask)
    rest = (torch.cat(mini[1:]) if len(mini) > 1 else torch.zeros(0, dtype=torch.long)) if first_from_policy \
        else torch.arange(batch.num_rows)
    if len(rest):
        sub = batch.take(rest)
        old_lp[rest, : sub.mask.shape[1]] = batch_logprobs(models.policy, sub, ctx.temp, ctx.budget, ctx.cdt)
    else:  # FSDP2: this rank's forward count still matches the other ranks'
        with torch.no_grad():
            for _ in range(pad_count(models.policy, 0)):
                dummy_forward(models.policy, batch.input_ids)
    return old_lp, first_from_policy


def reference_logp_phase(models: Models, batch: RolloutBatch, prm: PrmOut, ctx: _Ctx) -> torch.Tensor | None:
    """log π_ref at the sampling temperature [B, T] (the KL penalty and its metrics), reusing
    the PRM phase's reference forward at temperature 1; None without a reference model."""
    if models.ref is None:
        return None
    if ctx.use_prm and ctx.temp == 1.0:
        return prm.ref_lp
    return batch_logprobs(models.ref, batch, ctx.temp, ctx.budget, ctx.cdt)


def policy_phase(models: Models, batch: RolloutBatch, adv: torch.Tensor, old_lp: torch.Tensor,
                 ref_pol_lp: torch.Tensor | None, mini: list[torch.Tensor], first_from_policy: bool,
                 ctx: _Ctx) -> PolicyStats:
    """``batch.ppo_epochs`` passes of importance-corrected PPO (``loss.*``) over the
    mini-batches ``mini`` (row indices), each one optimiser step with gradient clipping;
    fills ``old_lp``'s rows from the first forward when ``first_from_policy``."""
    cfg, lc, temp = ctx.cfg, ctx.cfg.loss, ctx.temp
    band = lc.band()
    stats = PolicyStats()

    def pol_loss(model, micro, rows, normalizer, sub_idx, at_old):
        lp, ent = token_logprobs(model, micro.input_ids, micro.attention_mask, temp, ctx.cdt, with_entropy=True,
                                 entropy_grad=lc.entropy_coef > 0)
        T = lp.shape[1]
        idx = sub_idx[rows]
        if at_old:  # θ has not moved yet in this step: this forward is π_old
            old_lp[idx, :T] = lp.detach()
        loss, met = policy_loss(
            lp, old_lp[idx][:, :T], batch.behav_logp[idx][:, :T], adv[idx][:, :T], micro.mask,
            clip_eps=lc.clip_eps, correction=lc.correction, is_cap=lc.is_cap, normalizer=normalizer,
            is_low=band[0], is_high=band[1],
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

    losses, per_micro = [], []
    for epoch in range(cfg.batch.ppo_epochs):
        for j, rows in enumerate(mini):
            sub = batch.take(rows)
            n_tok = all_reduce(sub.mask.sum().clone())
            at_old = first_from_policy and epoch == 0 and j == 0
            loss, gn, extras = _train_minibatch(
                models.policy, models.policy_opt, sub,
                lambda mo, mi, r, n, rows=rows, at_old=at_old: pol_loss(mo, mi, r, n, rows, at_old),
                normalizer=float(n_tok), grad_clip=cfg.optim.policy.grad_clip, budget=ctx.budget, W=ctx.W,
                ocfg=cfg.optim.policy,
            )
            losses.append(loss)
            stats.grad_norms.append(gn)
            per_micro.extend(e for _, e in extras)
    stats.loss_sum = sum(losses)
    stats.minibatches = len(losses)
    for met, n in per_micro:  # token-weighted sums of the policy-loss metrics
        stats.add(met, n)
    stats.tokens = float(batch.mask.sum())
    stats.outcome_sum = float(batch.outcome.sum())
    return stats


def step_metrics(models: Models, batch: RolloutBatch, prm: PrmOut, adv: Advantages, stats: PolicyStats,
                 with_kl: bool, policy_version: int, ctx: _Ctx) -> dict[str, float]:
    """The step's ``loss/``, ``optim/``, ``reward/``, ``prm/`` and ``system/`` metrics, global
    (reduced or gathered over ranks). Collective: every rank calls it."""
    m: dict[str, float] = {}
    if prm.ce_loss is not None:
        m["loss/prm_ce"] = prm.ce_loss
    s = stats.reduce()
    n_pm = max(s.weight, 1.0)
    m["loss/policy"] = s.loss_sum / max(s.minibatches, 1)
    m["loss/clip_frac"] = s.clip_frac / n_pm
    m["loss/is_weight_mean"] = s.is_weight_mean / n_pm
    m["loss/mismatch_kl"] = s.mismatch_kl / n_pm
    m["loss/is_masked_frac"] = s.is_masked_frac / n_pm
    m["loss/is_capped_frac"] = s.is_capped_frac / n_pm
    m["loss/grad_norm"] = sum(s.grad_norms) / max(len(s.grad_norms), 1)
    m["loss/entropy"] = s.entropy / n_pm
    if with_kl:
        m["loss/kl_k1"], m["loss/kl_k3"] = s.kl_k1 / n_pm, s.kl_k3 / n_pm
    m["optim/policy_lr"] = models.policy_opt.param_groups[0]["lr"]
    m["reward/outcome_mean"] = s.outcome_sum / (batch.num_rows * ctx.W)
    on = adv.mask_all > 0
    m["reward/advantage_mean"] = float(adv.adv_all[on].mean())
    m["reward/advantage_std"] = float(adv.adv_all[on].std()) if on.sum() > 1 else 0.0
    m["reward/return_mean"] = float(adv.returns[on].mean())
    if adv.q_all is not None:
        seq = ctx.cfg.prime.beta * adv.q_all.sum(-1)  # β Σ_t q_t, the PRM's sequence score
        m["reward/process_mean"] = float(seq.mean())
        label = adv.outcome_all > 0.5
        m["prm/accuracy"] = float(((seq > 0) == label).float().mean())
    mask = batch.mask
    lag_all = all_gather_rows(torch.where(mask > 0, policy_version - batch.token_version, -1).float())
    lags = lag_all[lag_all >= 0]
    if lags.numel():
        m["system/version_lag_min"], m["system/version_lag_mean"], m["system/version_lag_max"] = (
            float(lags.min()), float(lags.mean()), float(lags.max()))
    m["system/tokens"] = s.tokens
    return m


__all__ = ["PolicyStats", "prime_step", "batch_logprobs", "optimizer_steps", "warmup_lr"]
