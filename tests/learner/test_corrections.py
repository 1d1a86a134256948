"""Off-policy corrections of learner/prime.py (``importance_weights``, ``policy_loss``'s
``correction``): for every mode a hand-computed case (arithmetic in the comments), an
equivalence test against a naive Python loop on random inputs, and padding/masking
invariance; plus the structure each mode promises (one weight per sequence, exactly the
tokens outside the band dropped, ``decoupled`` = AReaL's definition), the config fields and
the π_old recomputation in ``prime_step``. Tolerances <= 1e-5."""

import math
import typing
from pathlib import Path

import pytest
import torch

from common.config import ConfigError, LossConfig, load_config
from learner.prime import CORRECTIONS, importance_weights, policy_loss, sequence_log_ratio

TOL = dict(atol=1e-5, rtol=1e-5)
ROOT = Path(__file__).resolve().parents[2]
NEW = ["seq_truncate", "seq_mask", "icepop", "decoupled"]
F64 = torch.float64


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), **TOL)


# ---------------------------------------------------------------------------- hand case


def _hand_case():
    """Two responses, right-padded to T = 4; padding holds garbage.

    row 0: 3 tokens, old = 0, logp = (ln 1.5, ln 0.5, 0) -> ratio (1.5, 0.5, 1),
           A = (1, -1, 2), behav = (−ln 3, ln 4, 0) -> ρ = (3, 0.25, 1)
           ℓ (ε = 0.2) = (max(−1.5, −1.2), max(0.5, 0.8), −2) = (−1.2, 0.8, −2), clip active on 0, 1
    row 1: 2 tokens, old = 0, logp = (0, 0) -> ratio 1, A = (1, 1), behav = (−ln 2, −ln 4)
           -> ρ = (2, 4); ℓ = (−1, −1)
    5 response tokens in all (the denominator).
    """
    old = torch.zeros(2, 4, dtype=F64)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0, 50.0], [0.0, 0.0, -7.0, 9.0]], dtype=F64)
    behav = torch.tensor([[-math.log(3.0), math.log(4.0), 0.0, -50.0],
                          [-math.log(2.0), -math.log(4.0), 3.0, 1e3]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, 2.0, 1e9], [1.0, 1.0, -1e9, 5.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=F64)
    return logp.requires_grad_(True), old, behav, adv, mask


def _run(correction, **kw):
    logp, old, behav, adv, mask = _hand_case()
    loss, m = policy_loss(logp, old, behav, adv, mask, clip_eps=0.2, correction=correction, **kw)
    loss.backward()
    return loss.detach(), m, logp.grad


def test_hand_seq_truncate():
    # Π ρ: row 0 = 3·0.25·1 = 0.75 (< cap 2: w = 0.75), row 1 = 2·4 = 8 (capped: w = 2)
    # loss = (0.75·(−1.2 + 0.8 − 2) + 2·(−1 − 1)) / 5 = (−1.8 − 4) / 5 = −1.16
    loss, m, g = _run("seq_truncate", is_cap=2.0)
    close(loss, -1.16)
    close(m["is_weight_mean"], (3 * 0.75 + 2 * 2) / 5)  # 1.25
    close(m["is_capped_frac"], 2 / 5)  # row 1's two tokens
    # drops nothing: is_masked_frac is the token diagnostic, ρ outside [0.5, 2]: 3, 0.25, 4 -> 3/5
    close(m["is_masked_frac"], 3 / 5)
    # unclipped tokens only: row 0 token 2: −A·w/5 = −2·0.75/5 = −0.3; row 1: −1·2/5 = −0.4 each
    close(g, [[0.0, 0.0, -0.3, 0.0], [-0.4, -0.4, 0.0, 0.0]])


def test_hand_seq_mask():
    # geometric mean: row 0 = 0.75^(1/3) = 0.9086 in [0.5, 2] (kept); row 1 = √8 = 2.83 > 2 (dropped)
    # loss = (−1.2 + 0.8 − 2) / 5 = −0.48 (row 1 keeps its 2 places in the denominator)
    loss, m, g = _run("seq_mask", is_low=0.5, is_high=2.0)
    close(loss, -0.48)
    close(m["is_weight_mean"], 3 / 5)
    close(m["is_masked_frac"], 2 / 5)
    close(m["is_capped_frac"], 0.0)
    close(g, [[0.0, 0.0, -2 / 5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # widen the band to 3: √8 = 2.83 is inside, nothing dropped -> the plain mean (−2.4 − 2)/5 = −0.88
    loss, m, _ = _run("seq_mask", is_low=0.5, is_high=3.0)
    close(loss, -0.88)
    close(m["is_masked_frac"], 0.0)


def test_hand_icepop_drops_exactly_the_tokens_outside_the_band():
    # band [0.5, 2]: ρ = (3, 0.25, 1 | 2, 4) -> kept (no, no, yes | yes (bound inclusive), no)
    # w = ρ inside: (0, 0, 1 | 2, 0); loss = (1·(−2) + 2·(−1)) / 5 = −0.8
    logp, old, behav, _, mask = _hand_case()
    w, dropped, capped = importance_weights(old, behav, mask, "icepop", is_low=0.5, is_high=2.0)
    assert dropped.tolist() == [[True, True, False, False], [False, True, False, False]]
    assert not capped.any()
    close(w, [[0.0, 0.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    loss, m, g = _run("icepop", is_low=0.5, is_high=2.0)
    close(loss, -0.8)
    close(m["is_masked_frac"], 3 / 5)
    close(m["is_weight_mean"], 3 / 5)
    close(g, [[0.0, 0.0, -2 / 5, 0.0], [-2 / 5, 0.0, 0.0, 0.0]])
    # band [0.2, 4]: every token inside, w = ρ: (3·(−1.2) + 0.25·0.8 − 2 − 2 − 4) / 5 = −11.4/5
    loss, m, _ = _run("icepop", is_low=0.2, is_high=4.0)
    close(loss, -11.4 / 5)
    close(m["is_masked_frac"], 0.0)


def test_hand_decoupled_vs_truncate():
    # decoupled, cap 2: w = ρ·1[ρ ≤ 2] = (0, 0.25, 1 | 2, 0): (0.25·0.8 − 2 − 2) / 5 = −3.8/5 = −0.76
    loss, m, g = _run("decoupled", is_cap=2.0)
    close(loss, -0.76)
    close(m["is_masked_frac"], 2 / 5)  # the two tokens with ρ > 2
    close(m["is_weight_mean"], 3.25 / 5)
    close(g, [[0.0, 0.0, -2 / 5, 0.0], [-2 / 5, 0.0, 0.0, 0.0]])
    # truncate, cap 2: w = min(ρ, 2) = (2, 0.25, 1 | 2, 2): (−2.4 + 0.2 − 2 − 2 − 2) / 5 = −8.2/5
    loss_t, m_t, _ = _run("truncate", is_cap=2.0)
    close(loss_t, -8.2 / 5)
    close(m_t["is_capped_frac"], 2 / 5)
    # cap 4: no ρ above it, so the filter and the cap agree: w = ρ, (−3.6 + 0.2 − 2 − 2 − 4)/5 = −11.4/5
    close(_run("decoupled", is_cap=4.0)[0], -11.4 / 5)
    close(_run("truncate", is_cap=4.0)[0], -11.4 / 5)


# --------------------------------------------------------------------------- naive loop


def random_case(seed, G=4, K=4, T=8, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    B = G * K
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(F64)
    x = lambda: torch.randn(B, T, generator=g, dtype=F64)  # noqa: E731
    old = x() * 0.3 - 2
    logp = (old + x() * 0.3).requires_grad_(True)
    # token noise plus a per-row drift, so whole sequences fall on both sides of the bands
    behav = old + x() * spread + torch.randn(B, 1, generator=g, dtype=F64) * 0.5
    adv = x()
    return logp, old, behav, adv, mask, lengths


def naive_weights(rhos, correction, cap, lo, hi):
    """Per-token weights of one response from its list of ρ (plain Python)."""
    n = len(rhos)
    if correction == "none":
        return [1.0] * n
    if correction == "truncate":
        return [min(r, cap) for r in rhos]
    if correction == "mask":
        return [1.0 if 1 / cap <= r <= cap else 0.0 for r in rhos]
    if correction == "icepop":
        return [r if lo <= r <= hi else 0.0 for r in rhos]
    if correction == "decoupled":
        return [r if r <= cap else 0.0 for r in rhos]
    prod = 1.0
    for r in rhos:
        prod *= r
    if correction == "seq_truncate":
        return [min(prod, cap)] * n
    if correction == "seq_mask":
        geo = prod ** (1.0 / n)
        return [1.0 if lo <= geo <= hi else 0.0] * n
    raise AssertionError(correction)


def naive_loss_and_grad(logp, old, behav, adv, lengths, correction, eps, cap, lo, hi):
    B, T = logp.shape
    total, n = 0.0, sum(lengths)
    grad = torch.zeros(B, T, dtype=F64)
    dropped = capped = 0
    for i, L in enumerate(lengths):
        rhos = [math.exp(float(old[i, t] - behav[i, t])) for t in range(L)]
        ws = naive_weights(rhos, correction, cap, lo, hi)
        for t in range(L):
            ratio = math.exp(float(logp[i, t].detach() - old[i, t]))
            a = float(adv[i, t])
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            total += ws[t] * max(unclipped, clipped)
            if unclipped >= clipped:  # d(−A·ratio)/d logp = −A·ratio
                grad[i, t] = -a * ratio * ws[t] / n
        dropped += sum(1 for w in ws if w == 0.0)
        capped += sum(1 for w in ws if w == cap)
    return total / n, grad, dropped / n, capped / n


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_matches_naive_loop(correction):
    eps, cap, lo, hi = 0.2, 1.5, 0.6, 1.8
    for seed in (0, 1, 2):
        logp, old, behav, adv, mask, lengths = random_case(seed)
        want, want_g, drop_frac, cap_frac = naive_loss_and_grad(
            logp, old, behav, adv, lengths, correction, eps, cap, lo, hi)
        loss, m = policy_loss(logp, old, behav, adv, mask, clip_eps=eps, correction=correction,
                              is_cap=cap, is_low=lo, is_high=hi)
        close(loss, want)
        loss.backward()
        close(logp.grad, want_g)
        if correction in ("mask", "seq_mask", "icepop", "decoupled"):
            close(m["is_masked_frac"], drop_frac)
        if correction in ("truncate", "seq_truncate"):
            close(m["is_capped_frac"], cap_frac)
    # the random inputs exercise both sides of every rule (seed 0)
    logp, old, behav, adv, mask, _ = random_case(0)
    w, dropped, capped = importance_weights(old, behav, mask, correction, is_cap=cap, is_low=lo, is_high=hi)
    on = mask > 0
    if correction in ("mask", "seq_mask", "icepop", "decoupled"):
        assert dropped[on].any() and not dropped[on].all()
    if correction in ("truncate", "seq_truncate"):
        assert capped[on].any() and not capped[on].all()


# ---------------------------------------------------------------------- padding/masking


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_padding_garbage_changes_nothing(correction):
    kw = dict(clip_eps=0.2, correction=correction, is_cap=1.5, is_low=0.6, is_high=1.8)
    logp, old, behav, adv, mask, _ = random_case(5)
    loss, m = policy_loss(logp, old, behav, adv, mask, **kw)
    loss.backward()
    g = logp.grad.clone()
    pad = mask == 0
    for fill in (math.inf, -math.inf, 1e30):
        junk = lambda x: torch.where(pad, torch.tensor(fill, dtype=F64), x.detach())  # noqa: E731
        logp2 = junk(logp).requires_grad_(True)
        loss2, m2 = policy_loss(logp2, junk(old), junk(behav), junk(adv), mask, **kw)
        loss2.backward()
        close(loss2, loss.detach())
        close(logp2.grad, g)
        for k in m:
            assert torch.isfinite(m2[k]), k
            close(m2[k], m[k])
        # the weights themselves, and the sequence sums, ignore the padding too
        w1 = importance_weights(old, behav, mask, correction, is_cap=1.5, is_low=0.6, is_high=1.8)
        w2 = importance_weights(junk(old), junk(behav), mask, correction, is_cap=1.5, is_low=0.6, is_high=1.8)
        for a, b in zip(w1, w2):
            assert torch.equal(a, b)
        close(sequence_log_ratio(junk(old) - junk(behav), mask), sequence_log_ratio(old - behav, mask))


@pytest.mark.parametrize("correction", NEW)
def test_extra_padding_columns_change_nothing(correction):
    # the same responses padded to a longer T give the same loss and gradients
    kw = dict(clip_eps=0.2, correction=correction, is_cap=1.5, is_low=0.6, is_high=1.8)
    logp, old, behav, adv, mask, _ = random_case(6, T=5)
    loss, _ = policy_loss(logp, old, behav, adv, mask, **kw)
    loss.backward()
    wide = lambda x, v: torch.cat([x.detach(), torch.full((x.shape[0], 3), v, dtype=F64)], -1)  # noqa: E731
    logp2 = wide(logp, 7.0).requires_grad_(True)
    loss2, _ = policy_loss(logp2, wide(old, -math.inf), wide(behav, math.inf), wide(adv, 1e9), wide(mask, 0.0), **kw)
    loss2.backward()
    close(loss2, loss.detach())
    close(logp2.grad[:, :5], logp.grad)
    close(logp2.grad[:, 5:], torch.zeros(logp.shape[0], 3))


@pytest.mark.parametrize("correction", NEW)
def test_normalizer_splits_add_up(correction):
    # rows split over two micro-batches with normalizer = the whole token count: same loss
    kw = dict(correction=correction, is_cap=1.5, is_low=0.6, is_high=1.8)
    logp, old, behav, adv, mask, _ = random_case(7)
    whole, _ = policy_loss(logp, old, behav, adv, mask, **kw)
    n = float(mask.sum())
    parts = [slice(0, 5), slice(5, 16)]
    halves = sum(policy_loss(logp[s], old[s], behav[s], adv[s], mask[s], normalizer=n, **kw)[0] for s in parts)
    close(halves, whole)


# ------------------------------------------------------------------ structure per mode


@pytest.mark.parametrize("correction", ["seq_truncate", "seq_mask"])
def test_sequence_modes_one_weight_per_row(correction):
    logp, old, behav, adv, mask, lengths = random_case(3, spread=0.3)
    w, dropped, capped = importance_weights(old, behav, mask, correction, is_cap=1.5, is_low=0.6, is_high=1.8)
    for i, L in enumerate(lengths):
        assert torch.all(w[i, :L] == w[i, 0]), i
        assert dropped[i, :L].all() or not dropped[i, :L].any()
        assert capped[i, :L].all() or not capped[i, :L].any()
        assert torch.all(w[i, L:] == 0) and not dropped[i, L:].any() and not capped[i, L:].any()
    # the row weight is the product (seq_truncate) / geometric mean (seq_mask) of the token ρ
    S = sequence_log_ratio(old - behav, mask)
    for i, L in enumerate(lengths):
        s = sum(float(old[i, t] - behav[i, t]) for t in range(L))
        assert abs(float(S[i]) - s) < 1e-9
        if correction == "seq_truncate":
            assert abs(float(w[i, 0]) - min(math.exp(s), 1.5)) < 1e-9
        else:
            assert float(w[i, 0]) == (1.0 if 0.6 <= math.exp(s / L) <= 1.8 else 0.0)


def test_seq_mask_is_length_robust_geometric_mean():
    # 10 tokens, each ρ = 1.1: Π ρ = 1.1^10 = 2.594 (outside [0.5, 2]) but the geometric mean
    # is 1.1 (inside): the row is kept. One token with ρ = 2.594 (same product) is dropped.
    old = torch.zeros(2, 10, dtype=F64)
    behav = torch.full((2, 10), -math.log(1.1), dtype=F64)
    behav[1, 0] = -10 * math.log(1.1)
    mask = torch.zeros(2, 10, dtype=F64)
    mask[0] = 1.0
    mask[1, 0] = 1.0
    w, dropped, _ = importance_weights(old, behav, mask, "seq_mask", is_low=0.5, is_high=2.0)
    close(w[0], torch.ones(10))
    close(w[1], torch.zeros(10))
    assert dropped[1, 0] and not dropped[1, 1:].any() and not dropped[0].any()


def test_seq_truncate_stays_finite_in_log_space():
    # 50 tokens of log ρ = +20: Π ρ = e^1000 (overflows as a product) -> weight = cap;
    # 50 tokens of log ρ = −20: e^−1000 -> weight 0, not NaN
    old = torch.zeros(2, 50, dtype=torch.float32)
    behav = torch.stack([torch.full((50,), -20.0), torch.full((50,), 20.0)])
    mask = torch.ones(2, 50)
    w, _, capped = importance_weights(old, behav, mask, "seq_truncate", is_cap=2.0)
    assert torch.equal(w[0], torch.full((50,), 2.0)) and capped[0].all()
    assert torch.equal(w[1], torch.zeros(50)) and not capped[1].any()
    logp = torch.zeros(2, 50, requires_grad=True)
    loss, m = policy_loss(logp, old, behav, torch.ones(2, 50), mask, correction="seq_truncate", is_cap=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for k, v in m.items() if k not in ("is_ratio_mean", "mismatch_kl"))


def test_empty_row_is_harmless():
    # a row with no response token: weight 0 everywhere, no NaN, the other row unaffected
    logp, old, behav, adv, mask = _hand_case()
    mask[1] = 0.0
    for c in CORRECTIONS:
        w, dropped, capped = importance_weights(old, behav, mask, c)
        assert torch.equal(w[1], torch.zeros(4)) and not dropped[1].any() and not capped[1].any()
        loss, m = policy_loss(logp, old, behav, adv, mask, correction=c)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())


def test_decoupled_is_found_by_name_and_equals_its_definition():
    assert "decoupled" in CORRECTIONS
    assert typing.get_args(LossConfig.model_fields["correction"].annotation) == CORRECTIONS
    logp, old, behav, adv, mask, lengths = random_case(4, spread=0.8)
    cap = 1.5
    w, dropped, capped = importance_weights(old, behav, mask, "decoupled", is_cap=cap)
    # AReaL: behaviour weight π_prox/μ = exp(old − behav), tokens above the cap filtered out
    rho = torch.exp(old - behav)
    want = torch.where((rho <= cap) & (mask > 0), rho, torch.zeros_like(rho))
    close(w, want)
    assert torch.equal(dropped, (rho > cap) & (mask > 0))
    assert not capped.any()
    # = icepop with the band [0, cap]
    wi, di, _ = importance_weights(old, behav, mask, "icepop", is_low=0.0, is_high=cap)
    close(wi, w)
    assert torch.equal(di, dropped)
    kw = dict(clip_eps=0.2, is_cap=cap)
    loss_d, _ = policy_loss(logp, old, behav, adv, mask, correction="decoupled", **kw)
    loss_i, _ = policy_loss(logp, old, behav, adv, mask, correction="icepop", clip_eps=0.2, is_low=0.0, is_high=cap)
    close(loss_d, loss_i)
    # = truncate where no token's weight exceeds the cap, ≠ truncate where some do
    assert dropped.any()
    loss_t, _ = policy_loss(logp, old, behav, adv, mask, correction="truncate", **kw)
    assert abs(float(loss_d.detach() - loss_t.detach())) > 1e-3
    behav_in = torch.maximum(behav, old - math.log(cap) + 1e-3)  # ρ < cap everywhere
    for big_cap in (cap, 1e6):
        close(policy_loss(logp, old, behav_in, adv, mask, correction="decoupled", clip_eps=0.2, is_cap=big_cap)[0],
              policy_loss(logp, old, behav_in, adv, mask, correction="truncate", clip_eps=0.2, is_cap=big_cap)[0])


def test_old_names_still_work_and_bad_args_fail():
    logp, old, behav, adv, mask = _hand_case()
    for c in ("truncate", "mask"):
        policy_loss(logp, old, behav, adv, mask, correction=c)
    with pytest.raises(ValueError, match="correction"):
        policy_loss(logp, old, behav, adv, mask, correction="tis")
    for lo, hi in ((1.0, 2.0), (0.5, 1.0), (-0.1, 2.0)):
        with pytest.raises(ValueError, match="is_low"):
            policy_loss(logp, old, behav, adv, mask, correction="icepop", is_low=lo, is_high=hi)
    with pytest.raises(ValueError, match="is_cap"):
        importance_weights(old, behav, mask, "decoupled", is_cap=0.5)


# ------------------------------------------------------------------------------ config


def test_config_modes_and_bounds():
    tiny = ROOT / "configs" / "tiny.yaml"
    for c in CORRECTIONS:
        assert load_config(tiny, [f"loss.correction={c}"]).loss.correction == c
    cfg = load_config(tiny, ["loss.is_low=0.2", "loss.is_high=5"])
    assert (cfg.loss.is_low, cfg.loss.is_high) == (0.2, 5.0)
    assert (LossConfig().is_low, LossConfig().is_high) == (0.5, 2.0)
    for bad, field in (("loss.is_low=1.0", "loss.is_low"), ("loss.is_high=1.0", "loss.is_high"),
                       ("loss.is_high=0.7", "loss.is_high"), ("loss.is_low=-0.5", "loss.is_low")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(tiny, [bad])


# ---------------------------------------------------------------- prime_step wiring


@pytest.mark.parametrize("correction", NEW)
def test_prime_step_recomputes_pi_old_and_runs(correction, monkeypatch):
    from synthetic import make_groups, tiny_qwen2

    import learner.step as step
    from learner.rollout import build_batch

    base = ["batch.prompts_per_step=4", "generation.k=4", "batch.policy_mini_batch=8", "batch.prm_mini_batch=16",
            "batch.micro_batch_tokens=48", "optim.policy.lr=1e-3", "prime.use_process_rewards=false", "prime.prm_update=none"]
    calls = []
    real = step.batch_logprobs
    monkeypatch.setattr(step, "batch_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = {}
    for c in ("none", correction):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", base + [f"loss.correction={c}"])
        policy = tiny_qwen2(0)
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.policy.lr)
        models = step.Models(policy, None, None, opt, None)
        p0 = torch.cat([p.detach().flatten().clone() for p in policy.parameters()])
        calls.clear()
        m = step.prime_step(models, build_batch(make_groups(4, seed=1)), cfg, policy_version=0)
        counts[c] = len(calls)
        assert not torch.equal(torch.cat([p.detach().flatten() for p in policy.parameters()]), p0)
        for k, v in m.items():
            assert v == v and abs(v) != float("inf"), (k, v)
    assert counts[correction] == counts["none"] + 1  # π_old recomputed for every mode but none


def test_seq_mask_has_its_own_band():
    """LossConfig.band(): seq_mask reads loss.seq_is_low/seq_is_high (default verl's geometric
    preset [0.999, 1.001]), icepop loss.is_low/is_high; both validated. With the token band
    [0.5, 2] a response whose tokens drift by 1% each is kept, with seq_mask's default dropped."""
    tiny = ROOT / "configs" / "tiny.yaml"
    assert LossConfig(correction="seq_mask").band() == (0.999, 1.001)
    assert LossConfig(correction="icepop").band() == (0.5, 2.0)
    cfg = load_config(tiny, ["loss.correction=seq_mask", "loss.seq_is_low=0.9", "loss.seq_is_high=1.2"])
    assert cfg.loss.band() == (0.9, 1.2)
    for bad in ("loss.seq_is_low=1.0", "loss.seq_is_high=0.99"):
        with pytest.raises(ConfigError, match="seq_is"):
            load_config(tiny, [bad])
    mask = torch.ones(2, 30)
    behav = torch.full((2, 30), -1.0)
    old = behav.clone()
    old[0] += math.log(1.01)  # row 0: every token ρ = 1.01, geometric mean 1.01
    for band, kept0 in (((0.5, 2.0), True), (LossConfig(correction="seq_mask").band(), False)):
        w, dropped, _ = importance_weights(old, behav, mask, "seq_mask", is_low=band[0], is_high=band[1])
        assert bool(w[0].eq(1).all()) is kept0 and bool(dropped[0].any()) is (not kept0)
        assert bool(w[1].eq(1).all()) and not bool(dropped[1].any())  # ρ = 1 exactly: always kept
