"""learner/step.py: one PRIME step changes the weights sensibly, every PRM mode runs, and
a 2-rank gloo run (real processes) gives the same update as a 1-rank run, with DDP and
with FSDP2 (also when the ranks pack different numbers of micro-batches, and FSDP2 on a
1-rank process group)."""

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from synthetic import make_groups, tiny_qwen2  # noqa: E402

from common.config import load_config  # noqa: E402
from learner.distributed import close_dist, shard_groups  # noqa: E402
from learner.models import Models  # noqa: E402
from learner.rollout import build_batch  # noqa: E402
from learner.side_thread import overlap_ok  # noqa: E402
from learner.step import prime_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = [
    "batch.prompts_per_step=4", "generation.k=4", "batch.policy_mini_batch=8", "batch.prm_mini_batch=16",
    "batch.micro_batch_tokens=48", "optim.policy.lr=1e-3", "optim.prm.lr=1e-3",
    # eps large: Adam's first step is ~lr·g/(|g|+eps), linear in g, so float noise between
    # world sizes stays float noise instead of flipping signs of near-zero gradients
    "optim.policy.eps=1.0", "optim.prm.eps=1.0",
]


def make_models(cfg, seed=0, wrap=None):
    """Policy, PRM and reference from one tiny model; ``wrap`` (e.g. FSDP2 sharding) is
    applied to each before the optimisers are built over its parameters."""
    policy = tiny_qwen2(seed)
    prm = copy.deepcopy(policy)
    ref = copy.deepcopy(policy).requires_grad_(False)
    if wrap is not None:
        policy, prm, ref = wrap(policy), wrap(prm), wrap(ref)
    o = cfg.optim
    popt = torch.optim.AdamW(policy.parameters(), lr=o.policy.lr, eps=o.policy.eps, weight_decay=o.policy.weight_decay)
    qopt = torch.optim.AdamW(prm.parameters(), lr=o.prm.lr, eps=o.prm.eps, weight_decay=o.prm.weight_decay)
    return Models(policy, prm, ref, popt, qopt)


def params(model):
    """All parameters, flattened; FSDP2 shards are gathered (a collective then)."""
    from torch.distributed.tensor import DTensor

    m = model.module if hasattr(model, "module") else model
    return torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("prm_update", ["after", "before", "none"])
@pytest.mark.parametrize("correction", ["none", "truncate"])
def test_step_updates_weights(prm_update, correction):
    frozen = ["model.prm_path=a/trained/prm"] if prm_update == "none" else []  # (refused without one)
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      BASE + [f"prime.prm_update={prm_update}", f"loss.correction={correction}", *frozen])
    models = make_models(cfg)
    batch = build_batch(make_groups(4, seed=1))
    p0, q0 = params(models.policy), params(models.prm)
    m = prime_step(models, batch, cfg, policy_version=0)
    assert not torch.equal(params(models.policy), p0)
    assert torch.equal(params(models.prm), q0) == (prm_update == "none")
    for k, v in m.items():
        assert v == v and abs(v) != float("inf"), (k, v)
    assert m["system/tokens"] == float(batch.mask.sum())
    assert m["system/version_lag_max"] == 0.0
    assert 0.0 <= m["prm/accuracy"] <= 1.0
    if prm_update != "none":
        assert m["loss/prm_ce"] == pytest.approx(0.6931, abs=0.05)  # PRM = ref at start: σ(0) = 0.5


@pytest.mark.parametrize("case", ["two-mini-batches", "ppo-epochs-2", "ref-policy-old", "rloo-one-mini-batch"])
def test_pi_old_from_forwards_already_run_equals_its_own_pass(case, monkeypatch):
    """π_old taken from the first mini-batch's policy forward (and, with model.ref =
    policy_old at temperature 1, from the reference forward) gives the update that a
    separate π_old pass gives, and the separate pass then covers only the rows it must."""
    import learner.step as step

    extra = {"two-mini-batches": [], "ppo-epochs-2": ["batch.ppo_epochs=2"],
             "ref-policy-old": ["model.ref=policy_old"],
             "rloo-one-mini-batch": ["prime.use_process_rewards=false", "batch.policy_mini_batch=16"]}[case]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", BASE + ["loss.correction=truncate", *extra])
    batch = build_batch(make_groups(4, seed=2))
    out, rows_seen = {}, {}
    real = step.batch_logprobs
    for reuse in (False, True):
        models = make_models(cfg)
        if cfg.model.ref == "policy_old":
            models = Models(models.policy, models.prm, None, models.policy_opt, models.prm_opt)
        seen = rows_seen[reuse] = []

        def counting(model, b, *a, _m=models, _seen=seen, **kw):
            if model is _m.policy:
                _seen.append(b.num_rows)
            return real(model, b, *a, **kw)

        monkeypatch.setattr(step, "batch_logprobs", counting)
        monkeypatch.setattr(step, "REUSE_FORWARDS", reuse)
        m = prime_step(models, batch, cfg, policy_version=0)
        out[reuse] = (params(models.policy), params(models.prm), m)
    (p0, q0, m0), (p1, q1, m1) = out[False], out[True]
    assert torch.allclose(p0, p1, atol=1e-6, rtol=0) and torch.equal(q0, q1)
    for k in ("loss/policy", "loss/clip_frac", "loss/is_weight_mean", "loss/mismatch_kl", "loss/grad_norm"):
        assert m1[k] == pytest.approx(m0[k], abs=1e-5), k
    # no-grad policy passes: ref (policy_old) + π_old over all 16 rows, or only what is left
    want = {"two-mini-batches": ([16], [8]), "ppo-epochs-2": ([16], [8]), "ref-policy-old": ([16, 16], [16]),
            "rloo-one-mini-batch": ([16], [])}[case]
    assert (rows_seen[False], rows_seen[True]) == want


def test_credit_rules_run_through_the_step_and_change_the_advantages():
    """prime.process_credit=min (PURE) and prime.process_gamma reach the returns: same batch
    and models, a different policy update than the paper's sum form, everything finite;
    process_gamma = gamma is the paper's form exactly."""
    out = {}
    for name, extra in {"sum": [], "min": ["prime.process_credit=min"], "gamma_p0": ["prime.process_gamma=0"],
                        "gamma_p1": ["prime.process_gamma=1"]}.items():
        # prm_update=before: the PRM moves off the reference first, so the process rewards are not all 0
        cfg = load_config(ROOT / "configs" / "tiny.yaml", BASE + extra + ["prime.prm_update=before"])
        models = make_models(cfg)
        batch = build_batch(make_groups(4, seed=1))
        m = prime_step(models, batch, cfg, policy_version=0)
        assert all(v == v and abs(v) != float("inf") for v in m.values())
        out[name] = params(models.policy)
    assert not torch.allclose(out["sum"], out["min"])
    assert not torch.allclose(out["sum"], out["gamma_p0"])
    assert torch.equal(out["sum"], out["gamma_p1"])


def test_policy_moves_towards_correct_responses():
    # after a few steps on the same batch, correct responses gain log-prob relative to wrong ones
    cfg = load_config(ROOT / "configs" / "tiny.yaml", BASE + ["optim.policy.eps=1e-8", "prime.use_process_rewards=false"])
    models = make_models(cfg)
    batch = build_batch(make_groups(4, seed=2))
    from learner.step import batch_logprobs

    def margin():
        lp = (batch_logprobs(models.policy, batch, 1.0, 512) * batch.mask).sum(-1)
        good = batch.outcome > 0.5
        return float(lp[good].mean() - lp[~good].mean())

    before = margin()
    for _ in range(3):
        prime_step(models, batch, cfg, policy_version=0)
    assert margin() > before + 0.5


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _groups(kind):
    if kind == "uneven":  # rank 0 (groups 0, 2) gets long rows, rank 1 (groups 1, 3) short ones
        long, short = make_groups(2, seed=5, resp_len=(12, 20)), make_groups(2, seed=6, resp_len=(2, 2))
        return [long[0], short[0], long[1], short[1]]
    return make_groups(4, seed=3)


def _rank_main(rank, world, port, overrides, out_dir, parallel="ddp", kind="even"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    if parallel == "fsdp2":
        torch.use_deterministic_algorithms(True)
        from torch.distributed.device_mesh import init_device_mesh

        from learner.models import apply_fsdp2

        mesh = init_device_mesh("cpu", (world,))
        models = make_models(cfg, wrap=lambda m: apply_fsdp2(m, mesh))
    else:
        from learner.models import prm_group

        models = make_models(cfg)
        models.policy = torch.nn.parallel.DistributedDataParallel(models.policy)
        on_world = Models(models.policy, torch.nn.parallel.DistributedDataParallel(copy.deepcopy(models.prm)),
                          models.ref, models.policy_opt, models.prm_opt)
        overlap_world = overlap_ok(on_world, True)  # its all-reduce would race the policy's
        del on_world
        models.prm = torch.nn.parallel.DistributedDataParallel(models.prm, process_group=prm_group())
    overlap = overlap_ok(models, cfg.placement.prm_thread)  # on in these runs (off in configs/tiny.yaml)
    batch = build_batch(_groups(kind))
    mine = batch.groups(shard_groups(batch.num_groups, rank, world))
    m = prime_step(models, mine, cfg, policy_version=0)
    out = {"policy": params(models.policy), "prm": params(models.prm), "metrics": m, "overlap": overlap,
           "overlap_world": overlap_world if parallel != "fsdp2" else None}
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    del models  # DDP/FSDP2 hold the group: dropped first, then it is destroyed cleanly
    close_dist()


@pytest.mark.parametrize("prm_update", ["after", "before"])
def test_one_rank_and_two_ranks_agree(tmp_path, prm_update):
    overrides = BASE + [f"prime.prm_update={prm_update}", "placement.prm_thread=true"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    torch.set_num_threads(1)
    models = make_models(cfg)
    m1 = prime_step(models, build_batch(make_groups(4, seed=3)), cfg, policy_version=0)
    p1, q1 = params(models.policy), params(models.prm)

    tmp.start_processes(_rank_main, args=(2, _free_port(), overrides, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # the PRM's DDP on its own group: its update ran on the side thread; on the default group it may not
    assert r0["overlap"] and r1["overlap"] and r0["overlap_world"] is False
    assert torch.equal(r0["policy"], r1["policy"])  # replicas stay identical
    p0 = params(make_models(cfg).policy)
    assert (p1 - p0).abs().max() > 1e-5  # the step did something measurable
    torch.testing.assert_close(r0["policy"], p1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r0["prm"], q1, atol=1e-5, rtol=1e-4)
    for k in ("loss/prm_ce", "reward/outcome_mean", "reward/advantage_std", "system/tokens", "prm/accuracy"):
        assert r0["metrics"][k] == pytest.approx(m1[k], abs=1e-4), k


# FSDP2 vs the 1-rank (plain, = DDP at world 1) step. "uneven": rank 0 packs more
# micro-batches than rank 1 in every forward pass and every mini-batch, so rank 1 pads with
# zero-loss dummy micro-batches. A tight policy grad_clip makes clipping (on DTensor
# gradients) part of the comparison.
@pytest.mark.parametrize("world,kind,prm_update", [(2, "even", "after"), (2, "uneven", "before"), (1, "uneven", "after")])
def test_fsdp2_matches_one_rank(tmp_path, world, kind, prm_update):
    from learner.step import _micro_batches

    overrides = BASE + [f"prime.prm_update={prm_update}", "optim.policy.grad_clip=0.05", "placement.prm_thread=true"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    torch.set_num_threads(1)
    batch = build_batch(_groups(kind))
    if kind == "uneven":
        shares = [batch.groups(shard_groups(batch.num_groups, r, 2)) for r in range(2)]
        counts = [len(_micro_batches(sh, cfg.batch.micro_batch_tokens)) for sh in shares]
        assert counts[0] > counts[1], counts  # the padding path is exercised
    models = make_models(cfg)
    m1 = prime_step(models, batch, cfg, policy_version=0)
    p1, q1 = params(models.policy), params(models.prm)
    assert m1["loss/grad_norm"] > 0.05  # clipping was active

    tmp.start_processes(_rank_main, args=(world, _free_port(), overrides, str(tmp_path), "fsdp2", kind),
                        nprocs=world, start_method="spawn")
    rs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert not any(r["overlap"] for r in rs)  # FSDP2: the PRM work stays in sequence
    for r in rs[1:]:
        assert torch.equal(rs[0]["policy"], r["policy"]) and torch.equal(rs[0]["prm"], r["prm"])
    p0 = params(make_models(cfg).policy)
    assert (p1 - p0).abs().max() > 1e-5  # the step did something measurable
    torch.testing.assert_close(rs[0]["policy"], p1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rs[0]["prm"], q1, atol=1e-5, rtol=1e-4)
    for k in ("loss/prm_ce", "loss/policy", "loss/grad_norm", "reward/outcome_mean", "reward/advantage_std",
              "system/tokens", "prm/accuracy"):
        assert rs[0]["metrics"][k] == pytest.approx(m1[k], abs=1e-4, rel=1e-4), k


def test_kl_penalty_entropy_bonus_and_lr_warmup_act_on_the_update():
    """loss.kl_coef, loss.entropy_coef and optim.*.warmup_steps each change the policy's
    update from the same start; the KL to the reference is 0 before the first update (policy
    = reference) and logged; the warm-up's learning rate follows the optimiser's step count."""
    from learner.step import optimizer_steps, warmup_lr

    batch = build_batch(make_groups(4, seed=1))

    def run(*extra):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", BASE + list(extra))
        models = make_models(cfg)
        m = prime_step(models, batch, cfg, policy_version=0)
        return params(models.policy), m, models

    p_plain, m_plain, _ = run()
    assert m_plain["loss/kl_k1"] == pytest.approx(0.0, abs=0.05) and m_plain["loss/kl_k3"] >= 0.0
    assert m_plain["loss/entropy"] > 0.0
    p_kl, m_kl, _ = run("loss.kl_coef=5.0")
    p_ent, m_ent, _ = run("loss.entropy_coef=0.5")
    assert not torch.allclose(p_kl, p_plain) and not torch.allclose(p_ent, p_plain)
    # at π_θ = π_ref the k3 penalty and its gradient are exactly 0, so the first optimiser
    # step is the same with and without it and both runs measure the same KL on the second;
    # the penalty acts from the second step on (the weights above differ)
    assert m_kl["loss/kl_k3"] == pytest.approx(m_plain["loss/kl_k3"], rel=1e-5, abs=1e-9)
    assert m_plain["loss/kl_k3"] > 0.0

    # warm-up over 4 optimiser steps: 2 mini-batches this step -> lr of step n=1 = lr·2/4
    p_w, m_w, models = run("optim.policy.warmup_steps=4", "optim.prm.warmup_steps=4")
    assert optimizer_steps(models.policy_opt) == 2
    assert m_w["optim/policy_lr"] == pytest.approx(1e-3 * 2 / 4)
    assert models.prm_opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 1 / 4)  # one PRM step
    assert m_plain["optim/policy_lr"] == pytest.approx(1e-3)
    assert not torch.allclose(p_w, p_plain)
    assert [warmup_lr(1.0, n, 4) for n in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr(0.3, 7, 0) == 0.3
