"""The actor loop (actors/actor.py) and its prompt source (actors/prompts.py), end to end on
CPU: HF engine on a tiny random Qwen2 (tokenizer-free: prompts are token-id lists), a real
verifier pool with a stand-in ``parity`` kind (tests/pool_kinds.py), a real ``LearnerServer``
on 127.0.0.1 (random ports) and shm weight sync.

Checked: groups pass the server's validation (rejected counters stay 0), K responses each,
behaviour log-probs equal ``learner.logprobs.token_logprobs`` (mean abs < 1e-3), per-token
versions equal the engine's; a verifier ``error`` group is dropped and counted; a new version
published with new weights reaches the engine and later groups; admission blocks while the
learner is more than eta ahead; SIGTERM ends the loop cleanly and a second actor resumes
from the saved cursor.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from actors.actor import Actor
from actors.engines import make_engine
from actors.prompts import PromptSource, to_token_ids, write_jsonl
from actors.verifiers.pool import VerifierPool
from common.config import PrimeRunConfig
from common.transport import ActorClient, LearnerServer
from common.weight_sync import make_receiver, make_sender
from learner.logprobs import token_logprobs
from tests.synthetic import tiny_qwen2

torch.set_num_threads(1)

K, EOS, VOCAB, TEMP = 3, 2, 64, 0.9
KINDS = {"parity": "pool_kinds:parity"}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    m = tiny_qwen2(seed=0, vocab=VOCAB).eval()
    m.config.eos_token_id = EOS
    m.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=1, max_queue=64, extra_kinds=KINDS) as p:
        yield p


def make_cfg(**gen):
    return PrimeRunConfig(
        generation={"engine": "hf", "k": K, "temperature": TEMP, "max_tokens": 6, "max_prompt_tokens": 16, **gen},
        transport={"trajectory_addr": "tcp://127.0.0.1:*", "control_addr": "tcp://127.0.0.1:*",
                   "heartbeat_s": 0.2, "credit_window": 4},
        **{"async": {"max_staleness": 1, "weight_sync_timeout_s": 20}},
    )


def make_server(cfg, **kw):
    server = LearnerServer(cfg.transport, **kw).start()
    client_cfg = cfg.transport.model_copy(update={"trajectory_addr": server.trajectory_endpoint,
                                                  "control_addr": server.control_endpoint})
    return server, client_cfg


def prompt_file(tmp_path, n=12, error_at=()):
    rows = []
    for i in range(n):
        ids = [1] + [3 + (7 * i + j) % (VOCAB - 3) for j in range(2 + i % 3)]
        rows.append({"id": f"p{i}", "prompt": ids, "reference": "error" if i in error_at else i % 2})
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, rows)
    return path


def start_actor(cfg, tcfg, model_dir, pool, prompts, name="a0", receiver=None, **kw):
    engine = make_engine("hf", model_dir, eos_token_ids=[EOS], device="cpu", seed=1)
    client = ActorClient(tcfg, name).start()
    actor = Actor(cfg, name, engine, pool, client, prompts, weight_receiver=receiver, verifier_kind="parity", **kw)
    return actor, engine, client


def run_in_thread(actor, **kw):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("summary", actor.run(**kw)), daemon=True)
    t.start()
    return t, out


def recv_groups(server, n, timeout=60.0, until=None):
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        env = server.recv_group(timeout=0.5)
        if env is None:
            continue
        got.append(env)
        if until is not None and until(env):
            return got
        if until is None and len(got) >= n:
            return got
    raise AssertionError(f"received {len(got)} groups before the timeout")


def check_logprobs(model, env):
    g = env.body
    prompt = g.prompt_tokens.to_numpy().tolist()
    errs = []
    for r in g.responses:
        toks = r.token_ids.to_numpy().tolist()
        ids = torch.tensor([prompt + toks])
        with torch.no_grad():
            lp = token_logprobs(model, ids, torch.ones_like(ids), temperature=TEMP)[0, len(prompt) - 1:]
        errs.append((lp - r.behav_logp.to_torch()).abs().mean().item())
    assert max(errs) < 1e-3, errs


def check_group(env, version):
    g = env.body
    assert len(g.responses) == K and g.policy_version == version
    for r in g.responses:
        pv = r.policy_version.to_numpy()
        assert (pv == version).all() and len(pv) == len(r.token_ids.to_numpy()) >= 1
        assert r.finish_reason in ("stop", "length")
        assert r.verifier_status in ("correct", "wrong") and r.outcome_reward in (0.0, 1.0)
        assert r.behav_logp.dtype == "float32" and r.token_ids.dtype == "int32"


# ----------------------------------------------------------------------------- tests
def test_prompt_source_shards_cursor_and_templates(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"q{i}", "answer": str(i)} for i in range(7)]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    cur = tmp_path / "c" / "cursor.json"
    src = PromptSource(path, shard=1, num_shards=3, cursor_file=cur)
    assert len(src) == 2  # rows 1, 4
    (after, item), = src.next_batch(1)
    assert item == ("r1", "q1", "1")
    src.commit(after)
    src.save()
    again = PromptSource(path, shard=1, num_shards=3, cursor_file=cur)
    assert [it for _, it in again.next_batch(5)] == [("r4", "q4", "4")]
    with pytest.raises(ValueError):
        PromptSource(path, shard=0, num_shards=3, cursor_file=cur)

    class Tok:  # a stand-in tokenizer with a chat template
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return [100 + len(m["content"]) for m in messages] + [99]

        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    assert to_token_ids([5, 6], None) == [5, 6]
    assert to_token_ids("ab", Tok()) == [102, 99]
    assert to_token_ids([{"role": "user", "content": "abc"}], Tok()) == [103, 99]
    Tok.chat_template = None
    assert to_token_ids("ab", Tok()) == [97, 98]


def test_actor_groups_logprobs_weight_update_and_verifier_drop(tmp_path, model_dir, pool, shm_channel):
    cfg = make_cfg()
    server, tcfg = make_server(cfg, max_staleness=1)
    shm_dir, channel = shm_channel
    sender = make_sender("shm", num_receivers=0, channel=channel, shm_dir=shm_dir, timeout_s=20)
    receiver = make_receiver("shm", rank=1, num_receivers=1, channel=channel, shm_dir=shm_dir, timeout_s=20)
    prompts = PromptSource(prompt_file(tmp_path, error_at=(1,)), loop=True)
    actor, engine, client = start_actor(cfg, tcfg, model_dir, pool, prompts, receiver=receiver, prompts_per_batch=2)
    ref0 = tiny_qwen2(seed=0, vocab=VOCAB).eval()
    thread, out = run_in_thread(actor)
    try:
        first = recv_groups(server, 3)
        assert "p1" not in [e.body.prompt_id for e in first]  # verifier error: dropped
        for env in first:
            check_group(env, 0)
            check_logprobs(ref0, env)

        # a new policy: new weights through shm, then the announcement
        ref1 = tiny_qwen2(seed=1, vocab=VOCAB).eval()
        sender.send(ref1.state_dict(), 1)
        server.publish_policy(1, "shm", channel)
        later = recv_groups(server, 0, until=lambda e: e.body.policy_version == 1)
        check_group(later[-1], 1)
        check_logprobs(ref1, later[-1])
        assert engine.policy_version == 1
        assert torch.equal(engine.model.model.embed_tokens.weight, ref1.model.embed_tokens.weight)
        for env in later[:-1]:  # groups in between are all-old: never a mix of versions
            check_group(env, 0)
    finally:
        actor.request_stop()
        thread.join(timeout=30)
        server_counters = server.counters()
        server.close()
        sender.close()
        receiver.close()
    assert not thread.is_alive()
    s = out["summary"]
    assert s["groups_dropped_verifier"] >= 1 and s["weight_updates"] == 1
    assert server_counters["rejected"] == 0 and server_counters["rejected_trajectory"] == 0
    assert server_counters["received"] >= 4


def test_admission_blocks_until_within_eta(tmp_path, model_dir, pool, shm_channel):
    cfg = make_cfg()
    # learner at version 2, eta 1, actor at 0: not admitted until it holds version >= 1
    server, tcfg = make_server(cfg, max_staleness=1, policy_version=2)
    shm_dir, channel = shm_channel
    sender = make_sender("shm", num_receivers=0, channel=channel, shm_dir=shm_dir, timeout_s=20)
    receiver = make_receiver("shm", rank=1, num_receivers=1, channel=channel, shm_dir=shm_dir, timeout_s=20)
    prompts = PromptSource(prompt_file(tmp_path, n=4))
    actor, engine, client = start_actor(cfg, tcfg, model_dir, pool, prompts, receiver=receiver, prompts_per_batch=2)
    thread, out = run_in_thread(actor, max_groups=2)
    try:
        assert client.wait_ready(timeout=10)
        assert server.recv_group(timeout=1.5) is None  # blocked by admission
        assert engine.policy_version == 0 and actor.stats["groups_sent"] == 0
        assert client.admitted(0) is False
        ref2 = tiny_qwen2(seed=2, vocab=VOCAB).eval()
        sender.send(ref2.state_dict(), 2)
        server.publish_policy(3, "shm", channel)  # announced 3; shm holds 2: lag 1 <= eta
        got = recv_groups(server, 2)
        for env in got:
            check_group(env, 2)
        check_logprobs(ref2, got[0])
        thread.join(timeout=30)
        assert out["summary"]["groups_sent"] == 2
    finally:
        actor.request_stop()
        thread.join(timeout=30)
        assert server.counters()["rejected"] == 0
        server.close()
        sender.close()
        receiver.close()


def test_capacity_admission_bounds_the_groups_started(tmp_path, model_dir, pool):
    cfg = make_cfg()
    server, tcfg = make_server(cfg, max_staleness=1, admission_budget=3)
    prompts = PromptSource(prompt_file(tmp_path, n=12))
    actor, engine, client = start_actor(cfg, tcfg, model_dir, pool, prompts, prompts_per_batch=4)
    thread, out = run_in_thread(actor)
    try:
        got = recv_groups(server, 3)  # a batch of min(4, room 3) prompts
        server.set_admission(0)  # the learner accepted them: 3 - 3
        assert server.recv_group(timeout=1.5) is None  # no room is left
        assert actor.stats["groups_started"] == 3 and actor.stats["groups_sent"] == 3
        server.set_admission(5)  # after a step: room for 5 more
        got += recv_groups(server, 5)
        server.set_admission(0)
        assert server.recv_group(timeout=1.5) is None
        assert actor.stats["groups_started"] == 8  # batches of 4 + 1: never over the room
        assert [g.body.prompt_id for g in got] == [f"p{i}" for i in range(8)]
        # started and dropped reach the learner through the heartbeat
        rec = server._incs[(client.actor_id, client.incarnation)]
        assert rec.started == 8 and rec.dropped == 0
    finally:
        actor.request_stop()
        thread.join(timeout=30)
        assert server.counters()["rejected"] == 0
        server.close()


def test_sigterm_stops_cleanly_and_restart_resumes_cursor(tmp_path, model_dir, pool):
    cfg = make_cfg()
    server, tcfg = make_server(cfg, max_staleness=1)
    path, cursor = prompt_file(tmp_path, n=12), tmp_path / "cursor.json"
    received: list = []
    stop = threading.Event()

    def consume():
        while not stop.is_set():
            env = server.recv_group(timeout=0.2)
            if env is not None:
                received.append(env)
                if len(received) == 2:  # SIGTERM mid-run
                    os.kill(os.getpid(), signal.SIGTERM)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    prev = signal.getsignal(signal.SIGTERM)
    try:
        actor, _, _ = start_actor(cfg, tcfg, model_dir, pool, PromptSource(path, cursor_file=cursor),
                                  prompts_per_batch=2)
        summary = actor.run()  # main thread: installs its own SIGTERM handler
        assert summary["reason"] == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) == prev  # handler restored
        assert 2 <= summary["cursor"] < 12
        time.sleep(0.5)
        sent1 = [e.body.prompt_id for e in received]
        assert sent1 == [f"p{i}" for i in range(summary["cursor"])]  # in flight: finished, not lost
        first_inc = received[0].incarnation

        # a restarted actor (new client = new incarnation) resumes after the last prompt
        actor2, _, _ = start_actor(cfg, tcfg, model_dir, pool, PromptSource(path, cursor_file=cursor),
                                   prompts_per_batch=2)
        assert actor2.prompts.position == summary["cursor"]
        t2, out2 = run_in_thread(actor2, max_groups=2)
        t2.join(timeout=60)
        time.sleep(0.5)
        new = [e for e in received if e.incarnation != first_inc]
        assert [e.body.prompt_id for e in new] == [f"p{summary['cursor']}", f"p{summary['cursor'] + 1}"]
        assert out2["summary"]["cursor"] == summary["cursor"] + 2
    finally:
        stop.set()
        consumer.join(timeout=5)
        c = server.counters()
        server.close()
    assert c["rejected"] == 0 and c["goodbyes"] == 2 and c["incarnations"] == 2


def test_stop_without_credit_drops_in_flight_and_keeps_their_prompts(tmp_path, model_dir, pool):
    cfg = make_cfg()  # credit window 4; this learner never consumes
    server, tcfg = make_server(cfg, max_staleness=1)
    cursor = tmp_path / "cursor.json"
    actor, _, client = start_actor(cfg, tcfg, model_dir, pool,
                                   PromptSource(prompt_file(tmp_path), cursor_file=cursor),
                                   prompts_per_batch=2, stop_grace_s=0.3)
    thread, out = run_in_thread(actor)
    try:
        deadline = time.monotonic() + 30
        while client.groups_sent < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # now blocked on credit with groups in flight
        actor.request_stop()
        thread.join(timeout=30)
        s = out["summary"]
        assert s["groups_sent"] == 4 and s["groups_dropped_stop"] >= 1 and s["cursor"] == 4
        assert PromptSource(prompt_file(tmp_path), cursor_file=cursor).position == 4
    finally:
        actor.request_stop()
        thread.join(timeout=30)
        server.close()


def test_prompt_source_reads_parquet_with_cursor(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.prompts import PromptSource

    rows = [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"what is {i}+{i}?"}], "answer": str(2 * i)}
            for i in range(6)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    src = PromptSource(path, shard=1, num_shards=2, cursor_file=tmp_path / "cursor.json")
    batch = src.next_batch(2)
    assert [item[0] for _, item in batch] == ["q1", "q3"]
    assert batch[0][1][1] == [{"role": "user", "content": "what is 1+1?"}] and batch[0][1][2] == "2"
    src.commit(batch[-1][0])
    src.save()
    again = PromptSource(path, shard=1, num_shards=2, cursor_file=tmp_path / "cursor.json")
    assert [item[0] for _, item in again.next_batch(5)] == ["q5"]


def test_actor_lag_generates_with_weights_k_versions_behind(tmp_path, model_dir, pool, shm_channel):
    # async.actor_lag = 1: announced v1 -> keep v0; announced v2 -> load v1 (from the delay line)
    cfg = make_cfg()
    cfg = cfg.model_copy(update={"async_": cfg.async_.model_copy(update={"max_staleness": 2, "actor_lag": 1})})
    server, tcfg = make_server(cfg, max_staleness=2)
    shm_dir, channel = shm_channel
    sender = make_sender("shm", num_receivers=0, channel=channel, shm_dir=shm_dir, timeout_s=20)
    receiver = make_receiver("shm", rank=1, num_receivers=1, channel=channel, shm_dir=shm_dir, timeout_s=20)
    prompts = PromptSource(prompt_file(tmp_path), loop=True)
    actor, engine, client = start_actor(cfg, tcfg, model_dir, pool, prompts, receiver=receiver, prompts_per_batch=2)
    thread, out = run_in_thread(actor)
    try:
        recv_groups(server, 2)
        ref1, ref2 = tiny_qwen2(seed=1, vocab=VOCAB).eval(), tiny_qwen2(seed=2, vocab=VOCAB).eval()
        sender.send(ref1.state_dict(), 1)
        server.publish_policy(1, "shm", channel)
        t0 = time.monotonic()
        while actor._fetched_for < 1:  # the actor took v1 into its delay line (after its batch: slow under load)
            assert time.monotonic() - t0 < 120
            time.sleep(0.05)
        for env in recv_groups(server, 3):
            check_group(env, 0)  # still v0: one behind the announced v1
        assert engine.policy_version == 0
        sender.send(ref2.state_dict(), 2)
        server.publish_policy(2, "shm", channel)
        later = recv_groups(server, 0, until=lambda e: e.body.policy_version == 1)
        check_group(later[-1], 1)
        check_logprobs(ref1, later[-1])  # v1's weights, kept while v2 was the newest
        assert engine.policy_version == 1
    finally:
        actor.request_stop()
        thread.join(timeout=30)
        server.close()
        sender.close()
        receiver.close()
    assert out["summary"]["weight_updates"] == 1
