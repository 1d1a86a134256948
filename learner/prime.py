"""PRIME math as pure tensor functions.

Contract
--------
- Pure: tensors in, tensors out. No I/O, no ``torch.distributed``, no config objects; the
  trainer maps config fields onto keyword arguments.
- Layout: rows are responses, shape ``[B, T]``; the K responses of one prompt are K
  consecutive rows (so ``B % K == 0``); ``mask`` is 1.0 on response tokens (EOS included)
  and 0.0 on padding. Masked-out positions never influence any result on masked-in
  positions, and every loss ignores them.
- Names follow the paper (Cui et al. 2025, arXiv 2502.01456) and ``docs/algorithm.md``
  (section numbers below refer to it).

Not covered here: model forwards (log-prob computation), batching, sharding, optimisers.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "implicit_process_rewards",
    "prm_ce_loss",
    "prime_batch_norm",
    "reverse_cumsum",
    "reverse_cummin",
    "min_form_process_returns",
    "place_on_last_token",
    "rloo_returns",
    "grpo_returns",
    "reinforce_returns",
    "zero_pad",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "importance_weights",
    "sequence_log_ratio",
    "CORRECTIONS",
    "accuracy_filter",
    "kl_to_reference",
    "regularised_loss",
]

WHITEN_EPS = 1e-8
PRIME_NORM_EPS = 1e-6


# --------------------------------------------------------------------------- helpers


def zero_pad(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is set, else 0; non-finite values on padding (−inf log-probs) vanish
    instead of turning into NaN as they would under ``x * mask``. Shapes: [B, T] -> [B, T]."""
    return torch.where(mask > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1.

    Args: x, mask: [B, T] (any broadcastable shapes). dim: reduce over this dim, or all.
    Returns: a scalar, or x reduced along ``dim``. An empty mask gives 0, not NaN.
    """
    xm = zero_pad(x, mask)
    mask = mask.to(x.dtype)
    num = xm.sum() if dim is None else xm.sum(dim)
    den = mask.sum() if dim is None else mask.sum(dim)
    return num / den.clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x − μ) / sqrt(var + 1e-8), with μ and the unbiased variance over masked entries.

    Args: x: [B, T]; mask: [B, T], 1.0 where an entry counts.
    Returns: [B, T]. Every entry goes through the same affine map, so entries outside the
    mask come out transformed too; they never affect μ or var, and callers mask them.
    """
    mask = mask.to(x.dtype)
    n = mask.sum()
    if n < 2:
        raise ValueError(f"masked_whiten needs at least 2 masked entries, got {int(n.item())}")
    mu = zero_pad(x, mask).sum() / n
    var = (zero_pad(x - mu, mask) ** 2).sum() / (n - 1)
    return (x - mu) * torch.rsqrt(var + WHITEN_EPS)


def reverse_cumsum(x: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted reverse cumulative sum along the last dim: out[..., t] = Σ_{s≥t} γ^{s−t} x[..., s].

    Args: x: [B, T]. Returns: [B, T].
    """
    if gamma == 1.0:
        return x.flip(-1).cumsum(-1).flip(-1)
    out = torch.empty_like(x)
    running = torch.zeros_like(x[..., 0])
    for t in range(x.shape[-1] - 1, -1, -1):
        running = x[..., t] + gamma * running
        out[..., t] = running
    return out


def reverse_cummin(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reverse cumulative minimum over the masked-in positions: out[b, t] = min of x[b, s]
    over s ≥ t with mask[b, s] set (PURE's min-form value of position t).

    Args: x, mask: [B, T]. Returns: [B, T], zero on padding.
    """
    big = torch.full((), torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device)
    filled = torch.where(mask > 0, x, big)
    return zero_pad(filled.flip(-1).cummin(-1).values.flip(-1), mask)


def place_on_last_token(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put one value per response on its last response token (the EOS position).

    Args: values: [B]; mask: [B, T]. Returns: [B, T], zero elsewhere. A response with no
    response token gets nothing (its row is all zero).
    """
    B, T = mask.shape
    m = mask > 0
    # index of the last True in each row: T-1 minus the first True of the flipped row
    last = (T - 1) - m.flip(-1).to(torch.int64).argmax(-1)
    out = torch.zeros(B, T, dtype=values.dtype, device=values.device)
    has_any = m.any(-1)
    rows = torch.arange(B, device=mask.device)[has_any]
    out[rows, last[has_any]] = values[has_any]
    return out


def _float_dtype(outcome: torch.Tensor, process_rewards: torch.Tensor | None) -> torch.dtype:
    """The floating dtype the returns are computed in: the process rewards', else the
    outcome's, else float32 (for integer 0/1 outcomes)."""
    if process_rewards is not None:
        return process_rewards.dtype
    return outcome.dtype if outcome.is_floating_point() else torch.float32


def _check_credit(process_credit: str, process_gamma: float | None = None) -> None:
    if process_credit not in ("sum", "min"):
        raise ValueError(f"process_credit must be 'sum' or 'min', got {process_credit!r}")
    if process_gamma is not None and process_credit == "min":
        raise ValueError("process_gamma discounts the sum form's process returns; the min form has no discount")


def _discounted(outcome_term: torch.Tensor, process_term: torch.Tensor, maskf: torch.Tensor,
                gamma: float, process_gamma: float | None) -> torch.Tensor:
    """Σ_{s≥t} γ^{s−t} o_s + Σ_{s≥t} γ_p^{s−t} p_s on [B, T], zero on padding; γ_p = γ when
    ``process_gamma`` is None (one discounted sum over both, the paper's form)."""
    if process_gamma is None or process_gamma == gamma:
        return zero_pad(reverse_cumsum(outcome_term + process_term, gamma), maskf)
    return zero_pad(reverse_cumsum(outcome_term, gamma) + reverse_cumsum(process_term, process_gamma), maskf)


def _check_group(B: int, group_size: int, need: int = 2) -> None:
    if group_size < need:
        raise ValueError(f"group_size must be >= {need}, got {group_size}")
    if B % group_size != 0:
        raise ValueError(f"batch of {B} responses is not a whole number of groups of {group_size}")


# ------------------------------------------------------------------- §2 process reward


def implicit_process_rewards(
    prm_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Implicit process rewards q_t = (log π_φ(y_t|y_<t) − log π_ref(y_t|y_<t)) · mask  (§2).

    Args: prm_logp, ref_logp, mask: [B, T] (log-probs of the sampled tokens).
    Returns: q: [B, T]; zero on padding. r_φ(y_t) = β·q_t.
    """
    return zero_pad(prm_logp - ref_logp, mask)


def prm_ce_loss(
    prm_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    outcome: torch.Tensor,
    beta: float,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Online PRM cross-entropy on outcome labels (§3).

    L_CE = − mean_y [ r_o·log σ(β Σ_t q_t) + (1 − r_o)·log(1 − σ(β Σ_t q_t)) ]

    Args: prm_logp, ref_logp, mask: [B, T]; outcome: [B] in [0, 1] (fractional for code);
    beta: β > 0; normalizer: divide the summed loss by this instead of B (a trainer that
    splits one mini-batch over micro-batches or ranks passes the mini-batch's size).
    Returns: scalar. Computed from logits, stable for large |β Σ q|.
    """
    q = implicit_process_rewards(prm_logp, ref_logp, mask)
    score = beta * q.sum(-1)
    total = F.binary_cross_entropy_with_logits(score, outcome.to(score.dtype), reduction="sum")
    return total / (score.shape[0] if normalizer is None else normalizer)


def prime_batch_norm(process_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``prime_norm = batch_norm`` (§2): divide every process reward by
    (max over the batch of |reverse cumsum of a response's rewards| + 1e-6).

    Args: process_rewards, mask: [B, T]. Returns: [B, T], zero on padding.
    """
    r = zero_pad(process_rewards, mask)
    scale = reverse_cumsum(r).abs().max()
    return r / (scale + PRIME_NORM_EPS)


def _normed_process(process_rewards, mask, prime_norm):
    if prime_norm == "batch_norm":
        return prime_batch_norm(process_rewards, mask)
    if prime_norm == "none":
        return zero_pad(process_rewards, mask)
    raise ValueError(f"prime_norm must be 'batch_norm' or 'none', got {prime_norm!r}")


# ------------------------------------------------------------------------ §4 advantages


def min_form_process_returns(
    process_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    baseline: Literal["rloo", "grpo", "none"],
    eps: float = 1e-6,
) -> torch.Tensor:
    """The process term of the returns under PURE's min-form credit assignment (Cheng et
    al. 2025, arXiv 2504.15275): a token's process value is the worst reward still ahead,
    V_{i,t} = min_{s≥t} r_{i,s}, instead of the sum Σ_{s≥t} r_{i,s}, so no run of high
    rewards can buy a trajectory's value. With v_j = V_{j,0} (response j's minimum), the
    estimator's baseline over the K responses of the group:
      rloo: V_{i,t} − (Σ_{j≠i} v_j)/(K−1)
      grpo: (V_{i,t} − mean_j v_j) / (std_j v_j + eps)      (std unbiased)
      none: V_{i,t}                                          (REINFORCE)
    (PURE computes the min through a softmax-weighted transform of the rewards whose sum
    tends to it as its temperature goes to 0; this is the limit itself.)

    Args: process_rewards, mask: [B, T]; group_size: K (≥ 2 unless baseline is none).
    Returns: [B, T], zero on padding; a response without tokens has v = 0.
    """
    B, T = mask.shape
    K = group_size
    maskf = mask.to(process_rewards.dtype)
    V = reverse_cummin(process_rewards, maskf)
    if baseline == "none":
        return V
    _check_group(B, K)
    big = torch.full((), torch.finfo(V.dtype).max, dtype=V.dtype, device=V.device)
    v = torch.where(maskf > 0, process_rewards, big).min(-1).values
    v = torch.where(maskf.sum(-1) > 0, v, torch.zeros_like(v)).view(B // K, K)
    if baseline == "rloo":
        b = (v.sum(-1, keepdim=True) - v) / (K - 1)
        out = V.view(B // K, K, T) - b.unsqueeze(-1)
    elif baseline == "grpo":
        out = (V.view(B // K, K, T) - v.mean(-1, keepdim=True).unsqueeze(-1)) / (v.std(-1, keepdim=True).unsqueeze(-1) + eps)
    else:
        raise ValueError(f"baseline must be 'rloo', 'grpo' or 'none', got {baseline!r}")
    return zero_pad(out.reshape(B, T), maskf)


def rloo_returns(
    process_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    process_baseline: Literal["official", "paper"] = "official",
    prime_norm: Literal["batch_norm", "none"] = "batch_norm",
    gamma: float = 1.0,
    process_credit: Literal["sum", "min"] = "sum",
    process_gamma: float | None = None,
) -> torch.Tensor:
    """RLOO returns from process and outcome rewards (paper Eq. 5; §4).

    Per reward source, a leave-one-out baseline within each group of K = group_size:
      process (after ``prime_norm``), with m_j the per-token mean of r over response j:
        official: r̃_{i,t} = r_{i,t}·K/(K−1) − (Σ_{j=1..K} m_j)/(K−1)   (PRIME-RL code)
        paper:    r̃_{i,t} = r_{i,t} − (Σ_{j≠i} m_j)/(K−1)                (Eq. 5)
      outcome: r_o(y^i) − (1/(K−1)) Σ_{j≠i} r_o(y^j), placed on the last response token.
    Returns = Σ_{s≥t} γ^{s−t} (r̃^process_s + r̃^outcome_s), the two sources summed 1:1;
    ``process_gamma`` γ_p (sum form only) discounts the process term on its own:
    Σ_{s≥t} γ^{s−t} r̃^outcome_s + Σ_{s≥t} γ_p^{s−t} r̃^process_s (γ_p = 0: each token keeps
    only its own process reward, which keeps the PRM's localisation of an error).
    Whiten them with ``masked_whiten`` to get the advantages. ``process_credit="min"``:
    the process term is PURE's min-form value with its RLOO baseline instead
    (``min_form_process_returns``; γ then discounts the outcome term only).

    Args: process_rewards: [B, T] (q_t or β·q_t; the scale cancels under batch_norm) or
    None for outcome-only RLOO (the paper's baseline); outcome: [B]; mask: [B, T];
    group_size: K ≥ 2 with B % K == 0. Returns: [B, T], zero on padding.
    """
    B, T = mask.shape
    K = group_size
    _check_group(B, K)
    maskf = mask.to(_float_dtype(outcome, process_rewards))
    outcome = outcome.to(maskf.dtype)

    # outcome: exact leave-one-out within the group
    o = outcome.view(B // K, K)
    o_loo = o - (o.sum(-1, keepdim=True) - o) / (K - 1)
    total = place_on_last_token(o_loo.reshape(B), mask)

    if process_rewards is not None:
        r = _normed_process(process_rewards.to(maskf.dtype), maskf, prime_norm)
        _check_credit(process_credit, process_gamma)
        if process_credit == "min":
            return zero_pad(reverse_cumsum(total, gamma) + min_form_process_returns(r, maskf, K, "rloo"), maskf)
        m = masked_mean(r, maskf, dim=-1).view(B // K, K)  # per-response token mean
        g_sum = m.sum(-1, keepdim=True)  # Σ_j m_j
        if process_baseline == "official":
            r_t = r.view(B // K, K, T) * (K / (K - 1)) - (g_sum / (K - 1)).unsqueeze(-1)
        elif process_baseline == "paper":
            r_t = r.view(B // K, K, T) - ((g_sum - m) / (K - 1)).unsqueeze(-1)
        else:
            raise ValueError(
                f"process_baseline must be 'official' or 'paper', got {process_baseline!r}"
            )
        return _discounted(total, zero_pad(r_t.reshape(B, T), maskf), maskf, gamma, process_gamma)

    return zero_pad(reverse_cumsum(total, gamma), maskf)


def grpo_returns(
    process_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    prime_norm: Literal["batch_norm", "none"] = "batch_norm",
    gamma: float = 1.0,
    eps: float = 1e-6,
    process_credit: Literal["sum", "min"] = "sum",
    process_gamma: float | None = None,
) -> torch.Tensor:
    """GRPO with implicit process rewards (paper Eq. 7).

      A^i_t = (r_o^i − mean_j r_o^j) / (std_j r_o^j + eps)
            + Σ_{s≥t} γ^{s−t} (r_{i,s} − mean_j m_j) / (std_j m_j + eps)
    with m_j = per-token mean of response j's process rewards (r_φ(y^j)/|y^j|); mean and
    std (unbiased) over the K responses of the group. The normalised outcome term sits on
    the last token, so with γ = 1 every token of response i carries it.

    ``process_credit="min"``: the process term is PURE's min-form value, normalised over the
    group (``min_form_process_returns``). ``process_gamma``: as in ``rloo_returns``.
    Args: as ``rloo_returns``; process_rewards None gives outcome-only GRPO.
    Returns: [B, T], zero on padding.
    """
    B, T = mask.shape
    K = group_size
    _check_group(B, K)
    maskf = mask.to(_float_dtype(outcome, process_rewards))
    o = outcome.to(maskf.dtype).view(B // K, K)
    o_n = (o - o.mean(-1, keepdim=True)) / (o.std(-1, keepdim=True) + eps)
    total = place_on_last_token(o_n.reshape(B), mask)
    if process_rewards is not None:
        r = _normed_process(process_rewards.to(maskf.dtype), maskf, prime_norm)
        _check_credit(process_credit, process_gamma)
        if process_credit == "min":
            return zero_pad(reverse_cumsum(total, gamma) + min_form_process_returns(r, maskf, K, "grpo", eps), maskf)
        m = masked_mean(r, maskf, dim=-1).view(B // K, K)
        mu, sd = m.mean(-1, keepdim=True), m.std(-1, keepdim=True)
        r_n = (r.view(B // K, K, T) - mu.unsqueeze(-1)) / (sd.unsqueeze(-1) + eps)
        return _discounted(total, zero_pad(r_n.reshape(B, T), maskf), maskf, gamma, process_gamma)
    return zero_pad(reverse_cumsum(total, gamma), maskf)


def reinforce_returns(
    process_rewards: torch.Tensor | None,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    prime_norm: Literal["batch_norm", "none"] = "batch_norm",
    gamma: float = 1.0,
    process_credit: Literal["sum", "min"] = "sum",
    process_gamma: float | None = None,
) -> torch.Tensor:
    """REINFORCE with implicit process rewards (paper Eq. 8): A^i_t = r_o^i + Σ_{s≥t} r_{i,s}
    (``process_credit="min"``: r_o^i + min_{s≥t} r_{i,s}, PURE's min form).

    With γ ≠ 1 the outcome (on the last token) and the process rewards are discounted
    together, unless ``process_gamma`` (as in ``rloo_returns``) is set.
    Args: process_rewards: [B, T] or None; outcome: [B]; mask: [B, T].
    Returns: [B, T], zero on padding.
    """
    maskf = mask.to(_float_dtype(outcome, process_rewards))
    total = place_on_last_token(outcome.to(maskf.dtype), mask)
    if process_rewards is not None:
        r = _normed_process(process_rewards.to(maskf.dtype), maskf, prime_norm)
        _check_credit(process_credit, process_gamma)
        if process_credit == "min":
            return zero_pad(reverse_cumsum(total, gamma) + min_form_process_returns(r, maskf, 1, "none"), maskf)
        return _discounted(total, r, maskf, gamma, process_gamma)
    return zero_pad(reverse_cumsum(total, gamma), maskf)


# ------------------------------------------------------------------------ §5 policy loss

#: Off-policy corrections between the behaviour policy μ (the actor's sampler) and π_old
#: (recomputed by the learner); ``policy_loss``'s ``correction`` and ``loss.correction``.
CORRECTIONS = ("none", "truncate", "mask", "seq_truncate", "seq_mask", "icepop", "decoupled")
Correction = Literal["none", "truncate", "mask", "seq_truncate", "seq_mask", "icepop", "decoupled"]
_DROPPING = ("mask", "seq_mask", "icepop", "decoupled")  # modes that zero some tokens' weight


def sequence_log_ratio(log_rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log of the sequence importance ratio, S_i = Σ_t log ρ_{i,t} = log Π_t ρ_{i,t}, summed
    over row i's response tokens only (a row of ``mask`` is one sequence).

    Args: log_rho, mask: [B, T]. Returns: [B]; 0 for a row without response tokens.
    Garbage (even ±inf) on padding does not enter the sum.
    """
    return zero_pad(log_rho, mask).sum(-1)


def importance_weights(
    old_logp: torch.Tensor,
    behav_logp: torch.Tensor,
    mask: torch.Tensor,
    correction: Correction = "none",
    is_cap: float = 2.0,
    is_low: float = 0.5,
    is_high: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-token weight w_{i,t} that an off-policy correction puts on the PPO loss (§9).

    ρ_{i,t} = exp(old_logp − behav_logp) = π_old/μ per token; S_i = Σ_t log ρ_{i,t} over row
    i's response tokens (``sequence_log_ratio``); n_i = number of those tokens; 1[·] is 1 if
    the condition holds, else 0; bounds are inclusive.
      none:         w = 1.
      truncate:     w_t = min(ρ_t, is_cap). Token-level truncated IS (TIS; Yao et al. 2025,
                    "Your efficient RL framework secretly brings you off-policy RL training").
      mask:         w_t = 1[1/is_cap ≤ ρ_t ≤ is_cap]. Token-level masking, symmetric band.
      icepop:       w_t = ρ_t · 1[is_low ≤ ρ_t ≤ is_high]. IcePop (Ling Team 2025, Ring-1T
                    report, "Every Step Evolves"): two-sided, asymmetric band; inside it the
                    token keeps its importance weight ρ_t, as the paper's M(k) = k on
                    [α, β], 0 outside (α = is_low, β = is_high).
      decoupled:    w_t = ρ_t · 1[ρ_t ≤ is_cap]. AReaL's decoupled PPO (Fu et al. 2025,
                    arXiv 2505.24298, Eq. 5): the proximal policy π_prox is our π_old, the
                    clip acts on π_θ/π_prox (``policy_loss`` does that for every mode) and
                    each token is weighted by the behaviour importance weight π_prox/μ = ρ_t.
                    AReaL's cap (``behav_imp_weight_cap`` in its code) *filters*: a token
                    whose weight exceeds the cap gets weight 0; it is not truncated to the
                    cap. So ``decoupled`` is NOT ``truncate``: they agree exactly when no
                    response token has ρ_t > is_cap, and differ on such tokens (truncate:
                    is_cap, decoupled: 0). It also equals ``icepop`` with is_low = 0,
                    is_high = is_cap. (The min(ρ, C) form of the decoupled objective is
                    ``truncate``.)
      seq_truncate: w_{i,t} = min(Π_t ρ_{i,t}, is_cap) = exp(min(S_i, log is_cap)) for every
                    token of row i. Sequence-level truncated IS (Liu, Li et al. 2025, "When
                    speed kills stability"): the unbiased sequence ratio, capped; computed
                    in log space, so a long sequence can neither overflow nor NaN.
      seq_mask:     w_{i,t} = 1[is_low ≤ exp(S_i / n_i) ≤ is_high] for every token of row i:
                    the whole sequence is dropped when its *geometric-mean* ratio
                    (Π_t ρ_{i,t})^{1/n_i} leaves the band (compared in log space:
                    log is_low ≤ S_i/n_i ≤ log is_high). Geometric, not the product, because
                    the product's log grows with length: a per-token drift of 1.001 over
                    3000 tokens gives Π ρ ≈ e^3 ≈ 20, so a fixed band on the product drops
                    long responses for a mismatch a short one would pass; the geometric
                    mean is length-robust ("geometric" rejection sampling in Liu, Li et al.
                    2025 / verl's rollout correction; GSPO's sequence ratio is the same mean).
                    Weight 1 inside (a rejection, not a reweighting). A row with no
                    response token has S/n := 0 (ratio 1).

    Args: old_logp, behav_logp, mask: [B, T]; is_cap ≥ 1; 0 ≤ is_low < 1 < is_high: the
    band of the mode that has one (the trainer passes ``LossConfig.band()``: loss.is_low/is_high
    for icepop's token ρ, loss.seq_is_low/seq_is_high for seq_mask's geometric mean, which
    sits orders of magnitude closer to 1).
    Returns (all [B, T], detached, zero/False on padding):
      w: the weight; dropped: bool, tokens the rule zeroes (only in mask, seq_mask, icepop,
      decoupled); capped: bool, tokens whose weight was cut down to is_cap (truncate,
      seq_truncate).
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    if is_cap < 1.0:
        raise ValueError(f"is_cap must be >= 1, got {is_cap}")
    if not (0.0 <= is_low < 1.0 < is_high):
        raise ValueError(f"need 0 <= is_low < 1 < is_high, got is_low={is_low}, is_high={is_high}")
    with torch.no_grad():
        on = mask > 0
        log_rho = zero_pad(old_logp.detach() - behav_logp.detach(), mask)
        rho = torch.exp(log_rho)
        no = torch.zeros_like(on)
        dropped, capped = no, no
        if correction == "none":
            w = torch.ones_like(rho)
        elif correction == "truncate":
            w = torch.clamp(rho, max=is_cap)
            capped = rho > is_cap
        elif correction == "mask":
            keep = (rho >= 1.0 / is_cap) & (rho <= is_cap)
            w, dropped = keep.to(rho.dtype), ~keep
        elif correction == "icepop":
            keep = (rho >= is_low) & (rho <= is_high)
            w, dropped = torch.where(keep, rho, torch.zeros_like(rho)), ~keep
        elif correction == "decoupled":
            keep = rho <= is_cap
            w, dropped = torch.where(keep, rho, torch.zeros_like(rho)), ~keep
        else:  # sequence level: one weight per row, on every token of the row
            S = sequence_log_ratio(log_rho, mask)  # [B]
            if correction == "seq_truncate":
                log_cap = math.log(is_cap)
                w_row = torch.exp(torch.clamp(S, max=log_cap))
                capped = (S > log_cap)[:, None].expand_as(on)
            else:  # seq_mask
                n = on.to(S.dtype).sum(-1).clamp(min=1.0)
                g = S / n  # log of the geometric-mean ratio
                lo = -math.inf if is_low == 0.0 else math.log(is_low)
                keep = (g >= lo) & (g <= math.log(is_high))
                w_row = keep.to(S.dtype)
                dropped = (~keep)[:, None].expand_as(on)
            w = w_row[:, None].expand_as(rho)
        w = zero_pad(w, mask)
        return w, dropped & on, capped & on


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    behav_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    correction: Correction = "none",
    is_cap: float = 2.0,
    normalizer: float | None = None,
    is_low: float = 0.5,
    is_high: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance-corrected PPO-clip loss, token-level mean over response tokens (§5, §9).

    ratio_t = exp(logp − old_logp);  ℓ_t = max(−A_t·ratio_t, −A_t·clip(ratio_t, 1−ε, 1+ε))
    ρ_t = exp(old_logp − behav_logp) (π_old/μ, detached), and the per-token weight w_t of
    ``correction`` (formulas and sources in ``importance_weights``):
      none: 1;  truncate: min(ρ_t, is_cap);  mask: 1[1/is_cap ≤ ρ_t ≤ is_cap];
      icepop: ρ_t·1[is_low ≤ ρ_t ≤ is_high];  decoupled (AReaL): ρ_t·1[ρ_t ≤ is_cap];
      seq_truncate: min(Π_t ρ_{i,t}, is_cap) on every token of row i;
      seq_mask: 1[is_low ≤ (Π_t ρ_{i,t})^{1/n_i} ≤ is_high] on every token of row i.
    Every mode other than none is a decoupled objective (π_old recomputed by the learner is
    the proximal policy the clip acts on; μ enters only through w).
    loss = Σ_t w_t·ℓ_t·mask_t / Σ_t mask_t   (a masked token keeps its place in the
    denominator: masking zeroes its weight, it does not re-normalise the others).
    ``normalizer`` replaces Σ_t mask_t (a trainer splitting one mini-batch over micro-batches
    or ranks passes the mini-batch's token count, so the pieces add up to the token mean;
    the sequence modes need whole rows in each piece, which row-wise splitting gives).

    Args: logp (with grad), old_logp, behav_logp, advantages, mask: [B, T]; is_cap ≥ 1;
    0 ≤ is_low < 1 < is_high (used by icepop and seq_mask).
    Returns: (scalar loss, metrics). Metrics (0-dim detached tensors, means over response tokens):
      clip_frac: share of response tokens where the clipped term is the active one;
      is_weight_mean: mean applied weight w (for the sequence modes, each sequence's weight
      counted once per token); is_ratio_mean: mean raw token ρ;
      is_masked_frac: share of tokens the mode drops (mask, icepop, decoupled: the tokens
      outside the band; seq_mask: the tokens of the dropped sequences); for the modes that
      drop nothing (none, truncate, seq_truncate) the diagnostic share of tokens with ρ
      outside [1/is_cap, is_cap] (what ``mask`` would drop);
      is_capped_frac: share of tokens whose weight was cut to is_cap (truncate: ρ_t > is_cap;
      seq_truncate: tokens of sequences with Π ρ > is_cap; 0 otherwise);
      mismatch_kl: k3 estimate of KL(μ‖π_old) = mean((ρ − 1) − log ρ) over tokens from μ;
      ratio_mean: mean of ratio_t; approx_kl: k3 estimate of KL(π_old‖π_θ), mean((r − 1) − log r)
      with r = ratio_t.
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    maskf = mask.to(logp.dtype)
    # zero the padding first: garbage (even ±inf) there must not reach the loss or the grads
    logp, old_logp, behav_logp, advantages = (
        zero_pad(t, mask) for t in (logp, old_logp, behav_logp, advantages)
    )
    w, dropped, capped = importance_weights(
        old_logp, behav_logp, mask, correction, is_cap=is_cap, is_low=is_low, is_high=is_high
    )
    w = w.to(logp.dtype)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(loss_unclipped, loss_clipped)

    den = maskf.sum().clamp(min=1.0) if normalizer is None else normalizer
    loss = (per_token * w * maskf).sum() / den

    with torch.no_grad():
        log_rho = (old_logp - behav_logp).to(logp.dtype)
        rho = torch.exp(log_rho)
        if correction in _DROPPING:
            masked = dropped
        else:
            masked = ~((rho >= 1.0 / is_cap) & (rho <= is_cap))
        metrics = {
            "clip_frac": masked_mean((loss_clipped > loss_unclipped).to(maskf.dtype), maskf),
            "is_weight_mean": masked_mean(w, maskf),
            "is_ratio_mean": masked_mean(rho, maskf),
            "is_masked_frac": masked_mean(masked.to(maskf.dtype), maskf),
            "is_capped_frac": masked_mean(capped.to(maskf.dtype), maskf),
            "mismatch_kl": masked_mean((rho - 1.0) - log_rho, maskf),
            "ratio_mean": masked_mean(ratio.detach(), maskf),
            "approx_kl": masked_mean((ratio.detach() - 1.0) - log_ratio.detach(), maskf),
        }
    return loss, metrics


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                    estimator: Literal["k1", "k3"] = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from the sampled tokens (§5; Schulman's
    estimators), with d_t = log π_ref(y_t) − log π_θ(y_t):
      k1: −d_t                  (unbiased, can be negative per token)
      k3: exp(d_t) − d_t − 1    (unbiased, ≥ 0 per token, lower variance)
    Differentiable in ``logp`` (the KL penalty's gradient); ``ref_logp`` is treated as constant.
    Args: logp, ref_logp, mask: [B, T]. Returns: [B, T], zero on padding.
    """
    d = zero_pad(ref_logp.detach() - logp, mask)
    if estimator == "k1":
        return zero_pad(-d, mask)
    if estimator == "k3":
        return zero_pad(torch.exp(d) - d - 1.0, mask)
    raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}")


def regularised_loss(pg_loss: torch.Tensor, kl: torch.Tensor | None, entropy: torch.Tensor | None,
                     mask: torch.Tensor, kl_coef: float, entropy_coef: float,
                     normalizer: float | None = None) -> torch.Tensor:
    """pg_loss + kl_coef · Σ_t kl_t / N − entropy_coef · Σ_t H_t / N over response tokens,
    N = Σ mask (or ``normalizer``, as in ``policy_loss``): the KL penalty to the reference and
    the entropy bonus as token-level means, like the PPO term (§5).
    Args: pg_loss: scalar; kl, entropy: [B, T] or None (a zero coefficient needs none);
    mask: [B, T]. Returns: scalar.
    """
    n = mask.sum() if normalizer is None else normalizer
    out = pg_loss
    if kl_coef:
        out = out + kl_coef * zero_pad(kl, mask).sum() / n
    if entropy_coef:
        out = out - entropy_coef * zero_pad(entropy, mask).sum() / n
    return out


# ---------------------------------------------------------------------- §6 data filter


def accuracy_filter(
    outcome: torch.Tensor, group_size: int, low: float = 0.2, high: float = 0.8
) -> torch.Tensor:
    """Keep a prompt group iff low ≤ mean outcome of its K responses ≤ high (inclusive, §6).

    Args: outcome: [B] with B % K == 0. Returns: bool [B // K].
    The mean is taken in float64 with a 1e-9 slack so that 1/5 counts as 0.2.
    """
    _check_group(outcome.shape[0], group_size, need=1)
    acc = outcome.to(torch.float64).view(-1, group_size).mean(-1)
    return (acc >= low - 1e-9) & (acc <= high + 1e-9)
