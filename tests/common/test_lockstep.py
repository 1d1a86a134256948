"""common/lockstep.py: the actor-side replay of the learner's
consumption against the real ``Ingest`` fed through a real LearnerServer/ActorClient, and the
evaluation weights the learner leaves for the evaluator in deterministic mode."""

import numpy as np
import pytest
import torch
from synthetic import group, live_link

from common.admission import AdmissionRule
from common.lockstep import LockstepSchedule, eval_weights_path, save_eval_weights
from learner.ingest import Ingest

def test_schedule_advances_every_groups_per_step_kept():
    s = LockstepSchedule(groups_per_step=2, eta=0, low=0.2, high=0.8)
    fates = [s.observe(o, False, v) for o, v in [((1, 0), 0), ((1, 1), 0), ((0, 1), 0), ((1, 0), 0), ((1, 0), 0)]]
    # kept, filtered, kept (step 0 full -> 1), then a version-0 group at step 1 is stale for η = 0
    assert fates == ["kept", "filtered", "kept", "stale", "stale"] and (s.step, s.taken) == (1, 0)
    assert s.observe((0, 1), False, 1) == "kept" and (s.step, s.taken) == (1, 1)
    assert s.fates == {"kept": 3, "stale": 2, "truncated": 0, "filtered": 1}


@pytest.fixture
def link():
    with live_link(credit_window=512, admission_budget=None) as pair:  # every group sent up front
        yield pair


@pytest.mark.parametrize("eta,per_batch", [(0, 4), (1, 8), (2, 5)])
def test_replay_predicts_the_learners_consumption(link, eta, per_batch):
    """An actor generating each batch at the schedule's step: the step the replay predicts
    for every group is the step at which the real Ingest hands it to the learner, and the
    groups the replay calls stale are the ones the learner drops as stale."""
    srv, cli = link
    B, rng = 3, np.random.default_rng(eta)
    sched = LockstepSchedule(B, eta, 0.2, 0.8)
    predicted: dict[str, int] = {}  # prompt id -> step
    predicted_stale: dict[str, int] = {}  # prompt id -> the step that finds it stale
    sent = 0
    while sent < 60:
        version = sched.step  # the version the actor generates this batch with
        batch = [group(f"p{sent + i}", rng.integers(0, 2, size=4), version) for i in range(per_batch)]
        for g in batch:  # verdicts known, then sent in order
            step = sched.step
            fate = sched.observe([r.outcome_reward for r in g.responses], False, version)
            if fate == "kept":
                predicted[g.prompt_id] = step
            elif fate == "stale":
                predicted_stale[g.prompt_id] = step
            assert cli.send_group(g, timeout=5)
        sent += per_batch
    assert predicted_stale or eta == 2  # the cases with η < 2 exercise the stale drop

    ing = Ingest(srv, AdmissionRule(eta=eta), filter_low=0.2, filter_high=0.8)
    consumed: dict[str, int] = {}
    step = 0
    while step < sched.step:  # every step the replay saw completed
        out, _ = ing.next_batch(B, current_version=step)
        consumed.update({g.prompt_id: step for g in out})
        step += 1
    assert consumed == {p: s for p, s in predicted.items() if s < sched.step}
    assert ing.counts["stale"] == sum(s < sched.step for s in predicted_stale.values())


def test_eval_weights_round_trip_with_tied_tensors(tmp_path):
    from safetensors.torch import load_file

    w = torch.randn(5, 3)
    state = {"embed.weight": w, "lm_head.weight": w, "norm.weight": torch.ones(3, dtype=torch.bfloat16)}
    path = save_eval_weights(tmp_path, state, 20)
    assert path == eval_weights_path(tmp_path, 20) == tmp_path / "eval_weights" / "v00000020.safetensors"
    back = load_file(str(path))
    assert set(back) == {"embed.weight", "norm.weight"}  # the tied alias written once
    assert torch.equal(back["embed.weight"], w) and back["norm.weight"].dtype == torch.bfloat16
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
