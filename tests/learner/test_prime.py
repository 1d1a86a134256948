"""Tests of learner/prime.py: a hand-computed case (arithmetic in the comments), an
equivalence test against a naive Python loop on random inputs, and padding/masking
invariance, for every function. Tolerances <= 1e-5."""

import math

import pytest
import torch

from learner.prime import (
    accuracy_filter,
    grpo_returns,
    implicit_process_rewards,
    kl_to_reference,
    masked_whiten,
    place_on_last_token,
    policy_loss,
    prime_batch_norm,
    prm_ce_loss,
    regularised_loss,
    reinforce_returns,
    reverse_cummin,
    reverse_cumsum,
    rloo_returns,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), **TOL)


# ------------------------------------------------------------------ random batch + naive


def random_batch(G=3, K=4, T=7, seed=0, dtype=torch.float64):
    """G groups of K responses, right-padded to T; lengths 1..T."""
    g = torch.Generator().manual_seed(seed)
    B = G * K
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    x = lambda: torch.randn(B, T, generator=g, dtype=dtype)  # noqa: E731
    outcome = torch.randint(0, 2, (B,), generator=g).to(dtype)
    return dict(B=B, K=K, T=T, mask=mask, lengths=lengths.tolist(), x=x, outcome=outcome, g=g)


def naive_norm(r, lengths, prime_norm):
    """Per-response lists of (optionally batch-normed) process rewards."""
    rows = [[float(r[i, t]) for t in range(n)] for i, n in enumerate(lengths)]
    if prime_norm == "batch_norm":
        mx = 0.0
        for row in rows:
            for t in range(len(row)):
                mx = max(mx, abs(sum(row[t:])))
        rows = [[v / (mx + 1e-6) for v in row] for row in rows]
    return rows


def naive_disc_returns(rewards, gamma):
    out = [0.0] * len(rewards)
    for t in range(len(rewards)):
        out[t] = sum(gamma ** (s - t) * rewards[s] for s in range(t, len(rewards)))
    return out


def naive_rloo(r, outcome, lengths, K, T, baseline, prime_norm, gamma):
    B = len(lengths)
    rows = naive_norm(r, lengths, prime_norm) if r is not None else None
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        g0 = (i // K) * K
        others = [j for j in range(g0, g0 + K) if j != i]
        per_tok = [0.0] * lengths[i]
        # outcome: exact leave-one-out on the last token
        per_tok[-1] += float(outcome[i]) - sum(float(outcome[j]) for j in others) / (K - 1)
        if rows is not None:
            means = {j: sum(rows[j]) / len(rows[j]) for j in range(g0, g0 + K)}
            for t in range(lengths[i]):
                if baseline == "paper":
                    per_tok[t] += rows[i][t] - sum(means[j] for j in others) / (K - 1)
                else:
                    per_tok[t] += rows[i][t] * K / (K - 1) - sum(means.values()) / (K - 1)
        for t, v in enumerate(naive_disc_returns(per_tok, gamma)):
            out[i, t] = v
    return out


# ------------------------------------------------------------- implicit process rewards


def test_implicit_process_rewards_hand():
    prm = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # q = (-1 - -1.5, -2 - -1, masked) = (0.5, -1.0, 0)
    close(implicit_process_rewards(prm, ref, mask), [[0.5, -1.0, 0.0]])


def test_implicit_process_rewards_naive_and_padding():
    b = random_batch(seed=1)
    prm, ref, mask = b["x"](), b["x"](), b["mask"]
    q = implicit_process_rewards(prm, ref, mask)
    for i, n in enumerate(b["lengths"]):
        for t in range(b["T"]):
            want = float(prm[i, t] - ref[i, t]) if t < n else 0.0
            assert abs(float(q[i, t]) - want) < 1e-9
    # garbage, even -inf, on padding changes nothing
    prm2 = torch.where(mask > 0, prm, torch.tensor(-math.inf, dtype=prm.dtype))
    close(implicit_process_rewards(prm2, ref, mask), q)


# ---------------------------------------------------------------------- PRM CE loss


def test_prm_ce_loss_hand():
    beta = 0.5
    # response 0: q = (0.5, 1.5) -> Σq = 2 -> score βΣq = 1; outcome 1: -log σ(1) = log(1+e^-1) = 0.3132616875
    # response 1: q = (-1, -1) -> score -1; outcome 0.5 (soft): -0.5 log σ(-1) - 0.5 log σ(1)
    #             = 0.5 (1.3132616875 + 0.3132616875) = 0.8132616875
    # mean = (0.3132616875 + 0.8132616875) / 2 = 0.5632616875
    prm = torch.tensor([[0.5, 1.5, 7.0], [-1.0, -1.0, 7.0]])
    ref = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    outcome = torch.tensor([1.0, 0.5])
    close(prm_ce_loss(prm, ref, mask, outcome, beta), 0.5632616875)


def test_prm_ce_loss_naive_and_padding():
    b = random_batch(seed=2)
    prm, ref, mask = b["x"](), b["x"](), b["mask"]
    outcome = torch.rand(b["B"], generator=b["g"], dtype=torch.float64)  # fractional labels
    beta = 0.05
    total = 0.0
    for i, n in enumerate(b["lengths"]):
        s = beta * sum(float(prm[i, t] - ref[i, t]) for t in range(n))
        p = 1.0 / (1.0 + math.exp(-s))
        total += -(float(outcome[i]) * math.log(p) + (1 - float(outcome[i])) * math.log(1 - p))
    close(prm_ce_loss(prm, ref, mask, outcome, beta), total / b["B"])
    noisy = torch.where(mask > 0, prm, torch.full_like(prm, 1e4))
    close(prm_ce_loss(noisy, ref, mask, outcome, beta), total / b["B"])


def test_prm_ce_loss_gradient_sign():
    # a correct response (label 1) should push its PRM log-probs up
    prm = torch.zeros(1, 3, requires_grad=True)
    loss = prm_ce_loss(prm, torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([1.0]), beta=0.05)
    loss.backward()
    assert (prm.grad < 0).all()


# -------------------------------------------------------------- reverse cumsum, placing


def test_reverse_cumsum_hand():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    close(reverse_cumsum(x), [[6.0, 5.0, 3.0]])
    # γ = 0.5: t=2: 3; t=1: 2 + 0.5·3 = 3.5; t=0: 1 + 0.5·3.5 = 2.75
    close(reverse_cumsum(x, 0.5), [[2.75, 3.5, 3.0]])


def test_place_on_last_token():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    out = place_on_last_token(torch.tensor([5.0, 6.0, 7.0]), mask)
    close(out, [[0.0, 5.0, 0.0], [0.0, 0.0, 6.0], [0.0, 0.0, 0.0]])


# ------------------------------------------------------------------------- batch norm


def test_prime_batch_norm_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    r = torch.tensor([[0.3, 0.0, 0.3], [0.6, -0.2, 9.0], [-0.6, 5.0, 5.0]])
    # reverse cumsums: row0 (0.6, 0.3, 0.3), row1 (0.4, -0.2), row2 (-0.6); max |.| = 0.6
    out = prime_batch_norm(r, mask)
    close(out, torch.tensor([[0.3, 0.0, 0.3], [0.6, -0.2, 0.0], [-0.6, 0.0, 0.0]]) / 0.600001)


# -------------------------------------------------------------------------------- RLOO

MASK3 = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
R3 = torch.tensor([[0.3, 0.0, 0.3], [0.6, -0.2, 9.0], [-0.6, 5.0, 5.0]])  # 9, 5, 5 are padding
O3 = torch.tensor([1.0, 0.0, 0.0])


def test_rloo_outcome_only_hand():
    # K = 3, outcomes (1, 0, 0): leave-one-out o_i - Σ_{j≠i} o_j / 2 = (1, -0.5, -0.5),
    # on the last token; reverse cumsum spreads it over each response.
    out = rloo_returns(None, O3, MASK3, group_size=3)
    close(out, [[1.0, 1.0, 1.0], [-0.5, -0.5, 0.0], [-0.5, 0.0, 0.0]])


def test_rloo_official_hand():
    # token means m = (0.2, 0.2, -0.6), Σm = -0.2; official r̃ = 1.5 r - Σm/2 = 1.5 r + 0.1
    # row0 (0.55, 0.10, 0.55) + outcome 1 on t=2 -> (0.55, 0.10, 1.55) -> returns (2.20, 1.65, 1.55)
    # row1 (1.00, -0.20) + outcome -0.5      -> (1.00, -0.70)       -> returns (0.30, -0.70)
    # row2 (-0.80) + outcome -0.5            -> (-1.30)             -> returns (-1.30)
    out = rloo_returns(R3, O3, MASK3, group_size=3, process_baseline="official", prime_norm="none")
    close(out, [[2.2, 1.65, 1.55], [0.3, -0.7, 0.0], [-1.3, 0.0, 0.0]])


def test_rloo_paper_hand():
    # paper (Eq. 5) r̃_i = r_i - Σ_{j≠i} m_j / 2: baselines row0 (0.2-0.6)/2 = -0.2,
    # row1 (0.2-0.6)/2 = -0.2, row2 (0.2+0.2)/2 = 0.2
    # row0 (0.5, 0.2, 0.5) + 1 -> (0.5, 0.2, 1.5) -> (2.2, 1.7, 1.5)
    # row1 (0.8, 0.0) - 0.5    -> (0.8, -0.5)     -> (0.3, -0.5)
    # row2 (-0.8) - 0.5        -> (-1.3)
    out = rloo_returns(R3, O3, MASK3, group_size=3, process_baseline="paper", prime_norm="none")
    close(out, [[2.2, 1.7, 1.5], [0.3, -0.5, 0.0], [-1.3, 0.0, 0.0]])


def test_rloo_batch_norm_is_norm_then_rloo():
    a = rloo_returns(R3, O3, MASK3, 3, prime_norm="batch_norm")
    b = rloo_returns(R3 / 0.600001, O3, MASK3, 3, prime_norm="none")  # max |revcumsum| = 0.6
    close(a, b)


@pytest.mark.parametrize("baseline", ["official", "paper"])
@pytest.mark.parametrize("prime_norm", ["batch_norm", "none"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_rloo_matches_naive_loop(baseline, prime_norm, gamma):
    b = random_batch(G=3, K=4, T=6, seed=3)
    r = b["x"]()
    out = rloo_returns(r, b["outcome"], b["mask"], 4, process_baseline=baseline, prime_norm=prime_norm, gamma=gamma)
    want = naive_rloo(r, b["outcome"], b["lengths"], 4, b["T"], baseline, prime_norm, gamma)
    close(out, want)
    out0 = rloo_returns(None, b["outcome"], b["mask"], 4, gamma=gamma)
    close(out0, naive_rloo(None, b["outcome"], b["lengths"], 4, b["T"], baseline, prime_norm, gamma))


@pytest.mark.parametrize("fn", ["rloo", "grpo", "reinforce", "rloo-min", "grpo-min", "reinforce-min"])
def test_returns_padding_invariance(fn):
    b = random_batch(G=2, K=3, T=5, seed=4)
    r, mask, o = b["x"](), b["mask"], b["outcome"]
    call = {
        "rloo": lambda r, m: rloo_returns(r, o, m, 3),
        "grpo": lambda r, m: grpo_returns(r, o, m, 3),
        "reinforce": lambda r, m: reinforce_returns(r, o, m),
        "rloo-min": lambda r, m: rloo_returns(r, o, m, 3, process_credit="min"),
        "grpo-min": lambda r, m: grpo_returns(r, o, m, 3, process_credit="min"),
        "reinforce-min": lambda r, m: reinforce_returns(r, o, m, process_credit="min"),
    }[fn]
    base = call(r, mask)
    # 1) garbage on padded positions
    r_garbage = torch.where(mask > 0, r, torch.full_like(r, 1e6))
    close(call(r_garbage, mask), base)
    # 2) extra padding columns
    pad = torch.full((r.shape[0], 4), -math.inf, dtype=r.dtype)
    wide = call(torch.cat([r, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1))
    close(wide[:, :5], base)
    assert (wide[:, 5:] == 0).all() and (base[mask == 0] == 0).all()


# ------------------------------------------------- PURE min-form credit assignment


def test_reverse_cummin_hand_and_padding():
    # row0 (3, 1, 2) -> (1, 1, 2); row1 (5, -1 | pad 9) -> (-1, -1, 0); padding never counts
    x = torch.tensor([[3.0, 1.0, 2.0], [5.0, -1.0, -9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    close(reverse_cummin(x, m), [[1.0, 1.0, 2.0], [-1.0, -1.0, 0.0]])


def test_rloo_min_form_hand():
    # min-form values V_t = min_{s>=t} r_s: row0 (0.3, 0, 0.3) -> (0, 0, 0.3), v0 = 0;
    # row1 (0.6, -0.2) -> (-0.2, -0.2), v1 = -0.2; row2 (-0.6) -> (-0.6), v2 = -0.6
    # leave-one-out baselines: b0 = (-0.2-0.6)/2 = -0.4, b1 = (0-0.6)/2 = -0.3, b2 = (0-0.2)/2 = -0.1
    # process: row0 (0.4, 0.4, 0.7), row1 (0.1, 0.1), row2 (-0.5); plus the outcome returns
    # (1, 1, 1), (-0.5, -0.5), (-0.5) of test_rloo_outcome_only_hand
    out = rloo_returns(R3, O3, MASK3, group_size=3, prime_norm="none", process_credit="min")
    close(out, [[1.4, 1.4, 1.7], [-0.4, -0.4, 0.0], [-1.0, 0.0, 0.0]])


def naive_min_form(r, outcome, lengths, K, T, estimator, prime_norm, gamma):
    rows = naive_norm(r, lengths, prime_norm)
    out = torch.zeros(len(lengths), T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        g0 = (i // K) * K
        group = list(range(g0, g0 + K))
        others = [j for j in group if j != i]
        mins = [min(rows[j]) for j in group]
        values = [min(rows[i][t:]) for t in range(n)]
        o = [float(outcome[j]) for j in group]
        if estimator == "rloo":
            o_i = o[i - g0] - sum(float(outcome[j]) for j in others) / (K - 1)
            proc = [v - sum(min(rows[j]) for j in others) / (K - 1) for v in values]
        elif estimator == "grpo":
            mu_o, mu_v = sum(o) / K, sum(mins) / K
            sd_o = math.sqrt(sum((x - mu_o) ** 2 for x in o) / (K - 1))
            sd_v = math.sqrt(sum((x - mu_v) ** 2 for x in mins) / (K - 1))
            o_i = (o[i - g0] - mu_o) / (sd_o + 1e-6)
            proc = [(v - mu_v) / (sd_v + 1e-6) for v in values]
        else:
            o_i, proc = o[i - g0], values
        outcome_returns = naive_disc_returns([0.0] * (n - 1) + [o_i], gamma)
        for t in range(n):
            out[i, t] = outcome_returns[t] + proc[t]
    return out


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce"])
@pytest.mark.parametrize("prime_norm", ["batch_norm", "none"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_min_form_matches_naive_loop(estimator, prime_norm, gamma):
    b = random_batch(G=3, K=4, T=6, seed=5)
    r, o, m = b["x"](), b["outcome"], b["mask"]
    kw = dict(prime_norm=prime_norm, gamma=gamma, process_credit="min")
    out = {"rloo": lambda: rloo_returns(r, o, m, 4, **kw), "grpo": lambda: grpo_returns(r, o, m, 4, **kw),
           "reinforce": lambda: reinforce_returns(r, o, m, **kw)}[estimator]()
    close(out, naive_min_form(r, o, b["lengths"], 4, b["T"], estimator, prime_norm, gamma))


def test_min_form_is_not_bought_by_high_rewards():
    # two responses with the same worst step: extra high rewards raise the sum-form value of
    # the first token but leave the min-form one where it was
    r = torch.tensor([[-1.0, 0.1, 0.1], [-1.0, 5.0, 5.0]])
    m, o = torch.ones(2, 3), torch.zeros(2)
    s = reinforce_returns(r, o, m, prime_norm="none")
    n = reinforce_returns(r, o, m, prime_norm="none", process_credit="min")
    assert s[1, 0] > s[0, 0] + 9 and n[0, 0] == n[1, 0] == -1.0


def test_rloo_rejects_bad_groups():
    with pytest.raises(ValueError, match="group"):
        rloo_returns(None, torch.ones(5), torch.ones(5, 2), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        rloo_returns(None, torch.ones(4), torch.ones(4, 2), group_size=1)
    with pytest.raises(ValueError, match="process_baseline"):
        rloo_returns(torch.ones(4, 2), torch.ones(4), torch.ones(4, 2), 2, process_baseline="x")
    with pytest.raises(ValueError, match="process_credit"):
        rloo_returns(torch.ones(4, 2), torch.ones(4), torch.ones(4, 2), 2, process_credit="max")


# ------------------------------------------------------------------- GRPO, REINFORCE


def test_grpo_hand():
    # K = 2, outcomes (1, 0): mean 0.5, unbiased std sqrt((0.25+0.25)/1) = 0.70710678
    #   -> normalised outcome (0.70710678, -0.70710678)
    # process (no norm): row0 (0.2, 0.4), m0 = 0.3; row1 (0.1), m1 = 0.1
    #   mean m = 0.2, std m = sqrt((0.01+0.01)/1) = 0.14142136
    #   row0 ((0.2-0.2)/0.1414, (0.4-0.2)/0.1414) = (0, 1.41421356); row1 (-0.70710678)
    # returns row0: (0 + 1.41421356 + 0.70710678, 1.41421356 + 0.70710678) = (2.12132034, 2.12132034)
    #         row1: (-0.70710678 - 0.70710678) = (-1.41421356)
    r = torch.tensor([[0.2, 0.4], [0.1, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    out = grpo_returns(r, torch.tensor([1.0, 0.0], dtype=torch.float64), mask, 2, prime_norm="none", eps=0.0)
    close(out, [[2.12132034, 2.12132034], [-1.41421356, 0.0]])


def test_reinforce_hand():
    # Eq. 8: A_t = r_o + Σ_{s≥t} r_s: r = (0.1, 0.2, 0.3), r_o = 1 -> (1.6, 1.5, 1.3)
    out = reinforce_returns(torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([1.0]), torch.ones(1, 3), prime_norm="none")
    close(out, [[1.6, 1.5, 1.3]])


def test_grpo_and_reinforce_match_naive_loop():
    b = random_batch(G=3, K=4, T=6, seed=5)
    r, o, K, T = b["x"](), b["outcome"], 4, b["T"]
    o[0:4] = torch.tensor([1.0, 0.0, 1.0, 0.0])  # group 0 must have outcome spread (std > 0)
    lengths = b["lengths"]
    rows = naive_norm(r, lengths, "batch_norm")
    want_g = torch.zeros(b["B"], T, dtype=torch.float64)
    want_r = torch.zeros(b["B"], T, dtype=torch.float64)
    eps = 1e-6
    for i, n in enumerate(lengths):
        g0 = (i // K) * K
        grp = range(g0, g0 + K)
        os_ = [float(o[j]) for j in grp]
        mo = sum(os_) / K
        so = math.sqrt(sum((x - mo) ** 2 for x in os_) / (K - 1))
        ms = [sum(rows[j]) / len(rows[j]) for j in grp]
        mm = sum(ms) / K
        sm = math.sqrt(sum((x - mm) ** 2 for x in ms) / (K - 1))
        for t in range(n):
            want_g[i, t] = (float(o[i]) - mo) / (so + eps) + sum((rows[i][s] - mm) / (sm + eps) for s in range(t, n))
            want_r[i, t] = float(o[i]) + sum(rows[i][s] for s in range(t, n))
    close(grpo_returns(r, o, b["mask"], K), want_g)
    close(reinforce_returns(r, o, b["mask"]), want_r)


def naive_split_discount(r, o, lengths, K, estimator, gamma, process_gamma, eps=1e-6):
    """Per-token outcome and process terms of each estimator, each discounted on its own."""
    rows = naive_norm(r, lengths, "batch_norm")
    out = torch.zeros(len(lengths), max(lengths), dtype=torch.float64)
    for i, n in enumerate(lengths):
        grp = range((i // K) * K, (i // K) * K + K)
        os_ = [float(o[j]) for j in grp]
        ms = [sum(rows[j]) / len(rows[j]) for j in grp]
        mo, mm = sum(os_) / K, sum(ms) / K
        if estimator == "rloo":
            o_i = float(o[i]) - (sum(os_) - float(o[i])) / (K - 1)
            proc = [x * K / (K - 1) - sum(ms) / (K - 1) for x in rows[i]]
        elif estimator == "grpo":
            so = math.sqrt(sum((x - mo) ** 2 for x in os_) / (K - 1))
            sm = math.sqrt(sum((x - mm) ** 2 for x in ms) / (K - 1))
            o_i = (float(o[i]) - mo) / (so + eps)
            proc = [(x - mm) / (sm + eps) for x in rows[i]]
        else:
            o_i, proc = float(o[i]), list(rows[i])
        a = naive_disc_returns([0.0] * (n - 1) + [o_i], gamma)
        b = naive_disc_returns(proc, process_gamma)
        for t in range(n):
            out[i, t] = a[t] + b[t]
    return out


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce"])
@pytest.mark.parametrize("gamma,process_gamma", [(1.0, 0.0), (1.0, 0.5), (0.9, 0.0), (0.9, 1.0), (0.9, 0.9)])
def test_process_gamma_matches_naive_loop(estimator, gamma, process_gamma):
    b = random_batch(G=3, K=4, T=6, seed=5)
    r, o, m = b["x"](), b["outcome"], b["mask"]
    o[0:4] = torch.tensor([1.0, 0.0, 1.0, 0.0])  # GRPO needs outcome spread in group 0
    kw = dict(gamma=gamma, process_gamma=process_gamma)
    out = {"rloo": lambda: rloo_returns(r, o, m, 4, **kw), "grpo": lambda: grpo_returns(r, o, m, 4, **kw),
           "reinforce": lambda: reinforce_returns(r, o, m, **kw)}[estimator]()
    close(out, naive_split_discount(r, o, b["lengths"], 4, estimator, gamma, process_gamma))
    if process_gamma == gamma:  # the paper's single discounted sum, unchanged
        close(out, {"rloo": lambda: rloo_returns(r, o, m, 4, gamma=gamma), "grpo": lambda: grpo_returns(r, o, m, 4, gamma=gamma),
                    "reinforce": lambda: reinforce_returns(r, o, m, gamma=gamma)}[estimator]())


def test_process_gamma_zero_keeps_the_penalty_on_the_blamed_token():
    # REINFORCE, r = (0, -1, 0) (the PRM blames token 1), r_o = 0:
    #   γ_p = 1 (paper): (-1, -1, 0): token 0, correct, is penalised as much as token 1
    #   γ_p = 0: (0, -1, 0): only the blamed token
    r, o, m = torch.tensor([[0.0, -1.0, 0.0]]), torch.zeros(1), torch.ones(1, 3)
    close(reinforce_returns(r, o, m, prime_norm="none"), [[-1.0, -1.0, 0.0]])
    close(reinforce_returns(r, o, m, prime_norm="none", process_gamma=0.0), [[0.0, -1.0, 0.0]])
    with pytest.raises(ValueError, match="process_gamma"):
        reinforce_returns(r, o, m, process_credit="min", process_gamma=0.0)


# ------------------------------------------------------------------------ masked whiten


def test_masked_whiten_hand():
    # masked entries (1, 2, 3): μ = 2, unbiased var = (1 + 0 + 1) / 2 = 1
    # -> ((1-2)/sqrt(1+1e-8), 0, (3-2)/sqrt(1+1e-8)); the masked 100 maps to 98/sqrt(1+1e-8)
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    s = 1 / math.sqrt(1 + 1e-8)
    close(masked_whiten(x, mask), [[-s, 0.0, ], [s, 98 * s]])


def test_masked_whiten_naive_and_padding():
    b = random_batch(seed=6)
    x, mask = b["x"](), b["mask"]
    vals = [float(x[i, t]) for i, n in enumerate(b["lengths"]) for t in range(n)]
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
    out = masked_whiten(x, mask)
    want = (x - mu) / math.sqrt(var + 1e-8)
    close(out[mask > 0], want[mask > 0])
    out2 = masked_whiten(torch.where(mask > 0, x, torch.full_like(x, -1e9)), mask)
    close(out2[mask > 0], out[mask > 0])
    with pytest.raises(ValueError):
        masked_whiten(x, torch.zeros_like(mask))


# ------------------------------------------------------------------------- policy loss


def _pl_case():
    # three response tokens + one padding token (garbage values)
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0, 50.0]], dtype=torch.float64, requires_grad=True)
    behav = torch.tensor([[-math.log(3.0), math.log(4.0), 0.0, -50.0]], dtype=torch.float64)  # ρ = 3, 0.25, 1
    adv = torch.tensor([[1.0, -1.0, 2.0, 1e9]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    return logp, old, behav, adv, mask


def test_policy_loss_hand_none():
    logp, old, behav, adv, mask = _pl_case()
    # token0: A=1, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped)
    # token1: A=-1, ratio 0.5: max(0.5, 0.8) = 0.8 (clipped)
    # token2: A=2, ratio 1: max(-2, -2) = -2 (not clipped)
    # loss = (-1.2 + 0.8 - 2) / 3 = -0.8; clip_frac = 2/3
    loss, m = policy_loss(logp, old, behav, adv, mask, clip_eps=0.2, correction="none")
    close(loss, -0.8)
    close(m["clip_frac"], 2 / 3)
    close(m["is_weight_mean"], 1.0)
    # ρ = (3, 0.25, 1): mean 4.25/3; outside [0.5, 2]: 2 of 3
    close(m["is_ratio_mean"], 4.25 / 3)
    close(m["is_masked_frac"], 2 / 3)
    # k3: (ρ-1) - log ρ = (2 - ln 3, -0.75 + ln 4, 0) = (0.9013877113, 0.6362943611, 0); mean 0.5125606908
    close(m["mismatch_kl"], 0.5125606908)
    loss.backward()
    # only token2 is unclipped: d/dlogp (-A·ratio) = -2·1, over 3 tokens -> -2/3; padding gets 0
    close(logp.grad, [[0.0, 0.0, -2 / 3, 0.0]])


def test_policy_loss_hand_truncate_and_mask():
    logp, old, behav, adv, mask = _pl_case()
    # truncate: w = min(ρ, 2) = (2, 0.25, 1): (-1.2·2 + 0.8·0.25 - 2·1) / 3 = -4.2/3 = -1.4
    loss, m = policy_loss(logp, old, behav, adv, mask, correction="truncate", is_cap=2.0)
    close(loss, -1.4)
    close(m["is_weight_mean"], (2 + 0.25 + 1) / 3)
    # mask: keep ρ in [0.5, 2] -> only token2: -2 / 3 (denominator stays 3 tokens)
    loss, m = policy_loss(logp, old, behav, adv, mask, correction="mask", is_cap=2.0)
    close(loss, -2 / 3)
    close(m["is_weight_mean"], 1 / 3)


@pytest.mark.parametrize("correction", ["none", "truncate", "mask"])
def test_policy_loss_matches_naive_loop_and_padding(correction):
    b = random_batch(G=2, K=4, T=6, seed=7)
    mask = b["mask"]
    old = b["x"]() * 0.3 - 2
    logp = (old + b["x"]() * 0.3).requires_grad_(True)
    behav = old + b["x"]() * 0.5
    adv = b["x"]()
    eps, cap = 0.2, 2.0
    total, n = 0.0, 0
    for i, L in enumerate(b["lengths"]):
        for t in range(L):
            ratio = math.exp(float(logp[i, t].detach() - old[i, t]))
            a = float(adv[i, t])
            ell = max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))
            rho = math.exp(float(old[i, t] - behav[i, t]))
            w = {"none": 1.0, "truncate": min(rho, cap), "mask": 1.0 if 1 / cap <= rho <= cap else 0.0}[correction]
            total += w * ell
            n += 1
    loss, _ = policy_loss(logp, old, behav, adv, mask, clip_eps=eps, correction=correction, is_cap=cap)
    close(loss, total / n)
    # padding: garbage, even ±inf, in every input changes neither the loss nor the gradient
    loss.backward()
    g = logp.grad.clone()
    logp2 = torch.where(mask > 0, logp.detach(), torch.tensor(math.inf, dtype=torch.float64)).requires_grad_(True)
    junk = lambda x: torch.where(mask > 0, x, torch.tensor(-math.inf, dtype=torch.float64))  # noqa: E731
    loss2, m2 = policy_loss(logp2, junk(old), junk(behav), junk(adv), mask, clip_eps=eps, correction=correction, is_cap=cap)
    loss2.backward()
    close(loss2, loss.detach())
    close(logp2.grad, g)
    assert all(torch.isfinite(v) for v in m2.values())


def test_policy_loss_rejects_unknown_correction():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="correction"):
        policy_loss(z, z, z, z, torch.ones(1, 2), correction="tis")


# --------------------------------------------------------------------- accuracy filter


def test_accuracy_filter_hand():
    # K = 4, group means 0.25, 1.0, 0.5, 0.0, 0.75 -> keep iff 0.2 <= mean <= 0.8
    o = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float32)
    assert accuracy_filter(o, 4).tolist() == [True, False, True, False, True]


def test_accuracy_filter_bounds_inclusive_and_naive():
    # K = 5: 1 of 5 correct is exactly 0.2 and 4 of 5 exactly 0.8: both kept (inclusive)
    o = torch.tensor([1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.float32)
    assert accuracy_filter(o, 5).tolist() == [True, True, False]
    # fractional (code) outcomes, naive loop
    g = torch.Generator().manual_seed(8)
    o = torch.rand(40, generator=g)
    got = accuracy_filter(o, 4, low=0.3, high=0.6).tolist()
    want = [0.3 <= sum(o[i:i + 4].tolist()) / 4 <= 0.6 for i in range(0, 40, 4)]
    assert got == want


def test_normalizer_splits_add_up():
    # one batch split in two halves with normalizer = the whole batch's count gives the same loss
    b = random_batch(G=2, K=2, T=5, seed=9)
    mask, o = b["mask"], b["outcome"]
    prm, ref = b["x"](), b["x"]()
    whole = prm_ce_loss(prm, ref, mask, o, 0.5)
    halves = sum(prm_ce_loss(prm[s], ref[s], mask[s], o[s], 0.5, normalizer=4) for s in (slice(0, 2), slice(2, 4)))
    close(halves, whole)
    logp, old, behav, adv = b["x"]() * 0.1, b["x"]() * 0.1, b["x"]() * 0.1, b["x"]()
    whole, _ = policy_loss(logp, old, behav, adv, mask, correction="truncate")
    n = float(mask.sum())
    halves = sum(policy_loss(logp[s], old[s], behav[s], adv[s], mask[s], correction="truncate", normalizer=n)[0]
                 for s in (slice(0, 2), slice(2, 4)))
    close(halves, whole)


# ------------------------------------------------------------- §5 KL penalty, entropy bonus
def test_kl_to_reference_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    d = [-1.5 + 1.0, -1.0 + 2.0]  # log π_ref − log π_θ on the two response tokens
    k1 = kl_to_reference(logp, ref, mask, "k1")
    k3 = kl_to_reference(logp, ref, mask, "k3")
    assert torch.allclose(k1, torch.tensor([[-d[0], -d[1], 0.0]]), atol=1e-6)
    assert torch.allclose(k3, torch.tensor([[math.exp(d[0]) - d[0] - 1, math.exp(d[1]) - d[1] - 1, 0.0]]), atol=1e-6)
    assert (k3 >= 0).all()
    with pytest.raises(ValueError):
        kl_to_reference(logp, ref, mask, "k2")


def test_kl_and_regularised_loss_match_naive_loop_and_padding():
    g = torch.Generator().manual_seed(3)
    B, T = 4, 6
    logp = -torch.rand(B, T, generator=g) * 3
    ref = -torch.rand(B, T, generator=g) * 3
    ent = torch.rand(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    for est in ("k1", "k3"):
        kl = kl_to_reference(logp, ref, mask, est)
        for b in range(B):
            for t in range(T):
                d = float(ref[b, t] - logp[b, t])
                want = (-d if est == "k1" else math.exp(d) - d - 1) if mask[b, t] else 0.0
                assert abs(float(kl[b, t]) - want) < 1e-5
        pg = torch.tensor(0.25)
        got = regularised_loss(pg, kl, ent, mask, kl_coef=0.1, entropy_coef=0.01)
        n = sum(float(mask[b, t]) for b in range(B) for t in range(T))
        want = 0.25 + sum(0.1 * float(kl[b, t]) - 0.01 * float(ent[b, t])
                          for b in range(B) for t in range(T) if mask[b, t]) / n
        assert abs(float(got) - want) < 1e-5
        # padding: garbage (even inf) where mask = 0 changes nothing
        junk = torch.where(mask > 0, torch.zeros_like(logp), torch.full_like(logp, float("inf")))
        kl_j = kl_to_reference(logp + junk.nan_to_num(posinf=50.0), ref - junk.nan_to_num(posinf=50.0), mask, est)
        assert torch.equal(kl_j, kl)
        assert float(regularised_loss(pg, kl_j, ent + junk, mask, 0.1, 0.01)) == pytest.approx(float(got), abs=1e-6)
    assert float(regularised_loss(pg, None, None, mask, 0.0, 0.0)) == 0.25  # zero coefficients need nothing


def test_kl_gradient_pulls_towards_the_reference():
    logp = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0]])
    mask = torch.ones(1, 2)
    regularised_loss(torch.tensor(0.0), kl_to_reference(logp, ref, mask, "k3"), None, mask, 1.0, 0.0).backward()
    # k3' = 1 − exp(ref − logp): positive where π_θ > π_ref (lower it), negative where below
    assert logp.grad[0, 0] > 0 and logp.grad[0, 1] < 0
