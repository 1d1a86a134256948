"""learner/ingest.py's ``check_group``: every kind of schema-valid but unusable group, by hand,
and sent to a live in-process learner through the real transport (LearnerServer + ActorClient):
each is rejected and counted by reason, and the learner trains on the good groups."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from synthetic import free_port, hostile, make_groups, tiny_qwen2, with_response  # noqa: E402

from common.config import load_config  # noqa: E402
from learner.ingest import GroupLimits, check_group  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LIMITS = GroupLimits(k=4, vocab_size=64, max_prompt_tokens=8, max_tokens=12)


def test_each_reason_by_hand():
    good = make_groups(3, seed=1, version=2, resp_len=(3, 6))
    assert all(check_group(g, 2, LIMITS) is None for g in good)
    assert check_group(good[0], 1, LIMITS) == "future_version"  # a learner at version 1 never published 2
    assert check_group(good[0], 2, GroupLimits()) is None       # nothing configured: schema checks only
    for reason, g in hostile(seed=5, version=2).items():
        assert check_group(g, 2, LIMITS) == reason, reason
    # negative token ids are out of any vocabulary
    neg = with_response(good[0], 0, token_ids=np.r_[good[0].responses[0].token_ids.to_numpy()[:-1], -3])
    assert check_group(neg, 2, GroupLimits()) == "token_id"


@pytest.fixture
def learner(tmp_path):
    from common.transport import ActorClient, LearnerServer
    from learner.trainer import Learner

    torch.set_num_threads(1)
    model_dir = tmp_path / "sft"
    tiny_qwen2(0).save_pretrained(model_dir)
    traj, ctrl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.policy_path={model_dir}", f"run.output_dir={tmp_path / 'run'}", "batch.prompts_per_step=4",
        "batch.policy_mini_batch=8", "batch.prm_mini_batch=16", "batch.micro_batch_tokens=64",
        "generation.max_prompt_tokens=8", "generation.max_tokens=12", "checkpoint.every=0",
        "logging.console=false", "transport.credit_window=64", f"transport.trajectory_addr={traj}", f"transport.control_addr={ctrl}"])
    server = LearnerServer(cfg.transport, max_staleness=cfg.async_.max_staleness).start()
    client = ActorClient(cfg.transport, "rogue").start()
    learner = Learner(cfg, server=server)
    assert client.wait_ready(20)
    yield learner, client
    client.close(linger_s=0.2)
    server.close()


def test_a_live_learner_rejects_and_counts_each_kind(learner):
    learner, client = learner
    assert learner.ingest.limits.vocab_size == 64  # read from the policy's embedding
    bad = hostile(seed=7)
    good = make_groups(4, seed=8, resp_len=(3, 6))
    for g in [*bad.values(), *good[:2], *hostile(seed=9).values(), *good[2:]]:  # interleaved
        assert client.send_group(g, timeout=10)
    m = learner.train_step()  # the four good groups make the step; nothing crashes
    assert learner.step == 1 and m["reward/outcome_mean"] == pytest.approx(
        np.mean([r.outcome_reward for g in good for r in g.responses]), abs=1e-6)
    assert m["system/ingest/rejected"] == 2 * len(bad)
    assert {k.rsplit("/", 1)[1]: v for k, v in m.items() if k.startswith("system/ingest/rejected/")} == \
           {reason: 2.0 for reason in bad}
    assert m["system/groups_kept"] == 4


def test_the_buffer_and_the_counters_round_trip_through_a_checkpoint(learner, tmp_path):
    """Groups kept beyond a step wait in the buffer; a checkpoint holds them and the intake
    counters, and a learner restored from it trains on exactly those groups next."""
    from learner.trainer import Learner

    learner, client = learner
    good = make_groups(7, seed=11, resp_len=(3, 6))
    for g in [*good, *hostile(seed=12, version=1).values()]:
        assert client.send_group(g, timeout=10)
    learner.train_step()  # takes 4; receiving stops once it has them (what has arrived waits, unjudged)
    while learner.ingest.arrived:
        learner.ingest._accept(learner.ingest.arrived.popleft(), learner.policy_version)
    while learner.ingest.counts["received"] < 7 + len(hostile(seed=12, version=1)):
        env = learner.server.recv_group(timeout=5)  # the rest arrive as the next step would take them
        assert env is not None
        learner.ingest._accept(env.body, learner.policy_version)
    assert [g.prompt_id for g in learner.ingest.buffer] == [g.prompt_id for g in good[4:]]
    # one more taken in after a batch was complete, not judged yet (Ingest.arrived): kept too
    late = make_groups(1, seed=13, resp_len=(3, 6))[0]
    assert client.send_group(late, timeout=10)
    env = learner.server.recv_group(timeout=5)
    assert env is not None
    learner.ingest.arrived.append(env.body)
    counts, rejected = dict(learner.ingest.counts), dict(learner.ingest.rejected)
    path = learner.save()
    assert path is not None

    again = Learner(learner.cfg, server=learner.server)
    assert again.restore() and again.step == 1 and again.policy_version == 1
    assert [g.prompt_id for g in again.ingest.buffer] == [g.prompt_id for g in good[4:]]
    assert [r.token_ids.to_numpy().tolist() for g in again.ingest.buffer for r in g.responses] == \
           [r.token_ids.to_numpy().tolist() for g in good[4:] for r in g.responses]
    assert [g.prompt_id for g in again.ingest.arrived] == [late.prompt_id]
    assert dict(again.ingest.counts) == counts and dict(again.ingest.rejected) == rejected
    assert sum(rejected.values()) == len(hostile(seed=12, version=1))
    # the next step takes the three buffered groups first, then the arrived one, judged now
    groups, _ = again.ingest.next_batch(4, again.policy_version)
    assert [g.prompt_id for g in groups] == [g.prompt_id for g in good[4:]] + [late.prompt_id]
    assert again.ingest.counts["received"] == counts["received"] + 1


def test_groups_the_dead_learner_received_after_its_checkpoint_are_counted_lost(tmp_path):
    """A learner resumed from the checkpoint of step 4 (10 groups received by then) reads the
    dead learner's last metrics row past step 4: 25 received in all, 3 lost in an earlier
    restart -> 15 more lost now. Rows of steps up to 4 do not count."""
    from learner.checkpoint import groups_lost_since

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 3, "system/groups_received": 8.0}, {"step": 4, "system/groups_received": 10.0},
            {"step": 5, "system/groups_received": 18.0},
            {"step": 6, "system/groups_received": 25.0, "system/groups_lost_in_restart": 3.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert groups_lost_since(path, 4, 10) == (15, 3)
    assert groups_lost_since(path, 6, 25) == (0, 0)  # nothing past the checkpoint
    assert groups_lost_since(tmp_path / "none.jsonl", 4, 10) == (0, 0)
