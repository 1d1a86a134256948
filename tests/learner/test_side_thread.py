"""learner/side_thread.py through learner/step.py: PRM work on the learner's second thread
(placement.prm_thread) gives exactly the sequential step's weights and metrics, the work
really runs there, and an error there reaches the caller."""

import threading
from pathlib import Path

import pytest
import torch

from synthetic import make_groups  # noqa: E402

from common.config import load_config  # noqa: E402
from learner.rollout import build_batch  # noqa: E402
from learner.side_thread import overlap_ok  # noqa: E402
from learner.step import prime_step  # noqa: E402
from test_learner_step import BASE, make_models, params  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*extra):
    return load_config(ROOT / "configs" / "tiny.yaml", BASE + list(extra))


@pytest.mark.parametrize("prm_update,extra", [
    ("after", []),                              # 1 PRM mini-batch, 3-4 micro-batches each forward
    ("after", ["batch.prm_mini_batch=8"]),      # 2 PRM mini-batches: only the last one trails
    ("after", ["batch.micro_batch_tokens=4096", "loss.correction=none"]),  # 1 micro-batch
    ("before", []),
    ("none", ["model.prm_path=a/trained/prm"]),
])
def test_side_thread_gives_the_sequential_step_exactly(prm_update, extra):
    torch.set_num_threads(1)
    out = {}
    for on in (False, True):
        cfg = _cfg(f"prime.prm_update={prm_update}", f"placement.prm_thread={str(on).lower()}", *extra)
        models = make_models(cfg)
        ms = [prime_step(models, build_batch(make_groups(4, seed=s)), cfg, policy_version=s) for s in range(3)]
        out[on] = params(models.policy), params(models.prm), ms, models
    (p0, q0, m0, _), (p1, q1, m1, models) = out[False], out[True]
    assert torch.equal(p0, p1) and torch.equal(q0, q1)
    for a, b in zip(m0, m1):
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == \
               {k: v for k, v in b.items() if not k.startswith("time/")}
        assert b["time/prm_wait_s"] >= 0.0
    assert (p0 - params(make_models(cfg).policy)).abs().max() > 1e-5  # the steps moved the policy
    if prm_update != "none":
        assert int(models.prm_opt.state[next(iter(models.prm.parameters()))]["step"]) == \
            3 * (2 if "batch.prm_mini_batch=8" in extra else 1)


def test_the_work_runs_on_the_side_thread():
    """Reference forward and (prm_update=after) the PRM's backward run on the side thread;
    the policy's forward and backward and the PRM's forward on the caller's."""
    cfg = _cfg("prime.prm_update=after", "placement.prm_thread=true")
    models = make_models(cfg)
    seen = {"ref_fwd": set(), "prm_fwd": set(), "prm_bwd": set(), "policy_bwd": set()}

    def note(key):
        return lambda *a, **k: seen[key].add(threading.current_thread().name)

    models.ref.register_forward_hook(note("ref_fwd"))
    models.prm.register_forward_hook(note("prm_fwd"))
    next(iter(models.prm.parameters())).register_hook(note("prm_bwd"))
    next(iter(models.policy.parameters())).register_hook(note("policy_bwd"))
    prime_step(models, build_batch(make_groups(4, seed=1)), cfg, policy_version=0)
    main = threading.current_thread().name
    assert seen["ref_fwd"] and all(n.startswith("prm-side") for n in seen["ref_fwd"]), seen
    assert seen["prm_bwd"] and all(n.startswith("prm-side") for n in seen["prm_bwd"]), seen
    assert seen["prm_fwd"] == {main} and seen["policy_bwd"] == {main}, seen

    off = _cfg("prime.prm_update=after", "placement.prm_thread=false")
    seen = {k: set() for k in seen}
    models = make_models(off)
    models.ref.register_forward_hook(note("ref_fwd"))
    next(iter(models.prm.parameters())).register_hook(note("prm_bwd"))
    prime_step(models, build_batch(make_groups(4, seed=1)), off, policy_version=0)
    assert seen["ref_fwd"] == {main} and seen["prm_bwd"] == {main}


def test_an_error_on_the_side_thread_reaches_the_step():
    cfg = _cfg("prime.prm_update=after", "placement.prm_thread=true")
    models = make_models(cfg)

    def broken(*a, **k):
        raise RuntimeError("PRM optimiser exploded")

    models.prm_opt.step = broken
    with pytest.raises(RuntimeError, match="PRM optimiser exploded"):
        prime_step(models, build_batch(make_groups(4, seed=1)), cfg, policy_version=0)


def test_overlap_is_refused_where_threads_cannot_share():
    cfg = _cfg()
    models = make_models(cfg)
    assert overlap_ok(models, True) and not overlap_ok(models, False)
    models.prm = None
    assert not overlap_ok(models, True)
