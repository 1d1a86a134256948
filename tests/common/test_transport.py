"""The ZeroMQ transport on real sockets (127.0.0.1, ports picked by the OS): credits,
duplicate/gap accounting, incarnations, liveness, admission with eta, shutdown, a 10k-message
fuzz against a live receiver, a SIGKILLed actor process, and CURVE."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq
import zmq.auth

from common import schema as S
from common.config import TransportConfig
from common.schema import (
    Credit,
    Envelope,
    Goodbye,
    Heartbeat,
    Hello,
    Int32Vector,
    SCHEMA_VERSION,
    ProtocolError,
    Response,
    TrajectoryGroup,
    encode,
    make_envelope,
)
from common.transport import (
    ActorClient,
    LearnerRestarted,
    LearnerServer,
    ShutdownRequested,
    TransportSecurityError,
    curve_enabled,
    is_loopback,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def make_group(seed=0, k=4, length=16, version=1) -> TrajectoryGroup:
    rng = np.random.default_rng(seed)
    responses = [
        Response.from_numpy(rng.integers(0, 32_000, length + i), -rng.exponential(1.0, length + i).astype(np.float32),
                            version, "stop", float(i % 2), "correct" if i % 2 else "wrong")
        for i in range(k)
    ]
    return TrajectoryGroup(prompt_id=f"prompt-{seed}", prompt_tokens=Int32Vector.from_numpy(rng.integers(0, 32_000, 8)),
                           responses=responses, policy_version=version, gen_s=0.5, verify_s=0.1)


def server_cfg(**kw) -> TransportConfig:
    base = dict(trajectory_addr="tcp://127.0.0.1:*", control_addr="tcp://127.0.0.1:*",
                heartbeat_s=0.05, peer_timeout_s=1.0, credit_window=4)
    base.update(kw)
    return TransportConfig(**base)


def client_cfg(srv: LearnerServer, **kw) -> TransportConfig:
    return srv.cfg.model_copy(update=dict(trajectory_addr=srv.trajectory_endpoint,
                                          control_addr=srv.control_endpoint, **kw))


@pytest.fixture
def server():
    servers = []

    def make(max_staleness=1, **kw):
        s = LearnerServer(server_cfg(**kw), max_staleness=max_staleness).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def client():
    clients = []

    def make(srv, actor_id="actor-0", ready=True, **kw):
        c = ActorClient(client_cfg(srv, **kw.pop("cfg", {})), actor_id, **kw).start()
        clients.append(c)
        if ready:
            assert c.wait_ready(10), "no state from the learner"
        return c

    yield make
    for c in clients:
        c.close(linger_s=0.2)  # the learner may not be reading: do not wait long for its ack


def wait_until(pred, timeout=10.0, step=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def raw_dealer(endpoint):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    return s


# --------------------------------------------------------------------------- basics


def test_loopback_detection_and_curve_rule():
    for ep in ("tcp://127.0.0.1:5555", "tcp://127.3.2.1:1", "tcp://localhost:9", "tcp://[::1]:5",
               "ipc:///tmp/x", "inproc://y", "tcp://127.0.0.1:*"):
        assert is_loopback(ep), ep
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.0.0.3:1", "tcp://eth0:5", "tcp://learner.host:5"):
        assert not is_loopback(ep), ep
    assert not curve_enabled(TransportConfig())
    assert curve_enabled(TransportConfig(curve_force=True))
    assert curve_enabled(TransportConfig(trajectory_addr="tcp://0.0.0.0:5555"))


def test_refuses_to_bind_beyond_loopback_without_keys():
    cfg = TransportConfig(trajectory_addr="tcp://0.0.0.0:*", control_addr="tcp://127.0.0.1:*")
    with pytest.raises(TransportSecurityError, match="curve_secret_key"):
        LearnerServer(cfg, max_staleness=1).start()
    with pytest.raises(TransportSecurityError, match="curve_client_secret_key"):
        ActorClient(TransportConfig(curve_force=True), "a").start()


def test_a_port_in_use_is_a_prompt_error_not_a_hang(server):
    """The control port is taken after the trajectory socket bound: start() raises the bind
    error and releases what it opened (an unclosed socket would block the context forever)."""
    cfg = server_cfg(control_addr=server().control_endpoint)
    t = time.monotonic()
    with pytest.raises(zmq.ZMQError, match="in use"):
        LearnerServer(cfg, max_staleness=1).start()
    assert time.monotonic() - t < 5


def test_another_runs_actor_is_refused_and_told_why(server, client):
    """Two runs on one address (a second run started on the same host and ports): the learner
    of run A records nothing of run B's actor, rejects its groups and control messages as
    other_run and tells it to stop, naming both; its own run's actor is served as usual."""
    srv = server(run_id="run-a")
    ours = client(srv, actor_id="actor-0", cfg={"run_id": "run-a"})
    theirs = client(srv, actor_id="actor-0", ready=False, cfg={"run_id": "run-b"})
    assert wait_until(lambda: theirs.shutdown_reason is not None, 10)
    assert "run-a" in theirs.shutdown_reason and "run-b" in theirs.shutdown_reason
    with pytest.raises(ShutdownRequested):
        theirs.send_group(make_group(1), timeout=1)
    # a group of run B sent anyway (raw, as from an actor still holding credits of its own learner)
    d = raw_dealer(srv.trajectory_endpoint)
    d.send(encode(make_envelope(make_group(2), "actor-0", theirs.incarnation, 0, run_id="run-b")))
    assert ours.send_group(make_group(3), timeout=10)
    env = srv.recv_group(10)
    assert env is not None and env.incarnation == ours.incarnation and env.body == make_group(3)
    # the learner reads (and rejects) the foreign group only while it receives: keep receiving
    assert wait_until(lambda: srv.recv_group(0.05) is None and srv.counters()["rejected_trajectory"] >= 1, 20)
    assert srv.counters()["rejected_trajectory"] == 1 and srv.recv_group(0.3) is None
    assert srv.counters()["rejected/other_run"] >= 2  # its Hello (and heartbeats) and its group
    assert [(a, i["incarnation"]) for a, i in srv.actor_info().items()] == [("actor-0", ours.incarnation)]
    assert ours.shutdown_reason is None
    d.close()


def test_groups_arrive_intact(server, client):
    srv = server(credit_window=8)
    c = client(srv)
    sent = [make_group(seed=i) for i in range(6)]
    for g in sent:
        assert c.send_group(g, timeout=10)
    for i, g in enumerate(sent):
        env = srv.recv_group(10)
        assert env is not None and env.seq == i
        assert (env.actor_id, env.incarnation) == ("actor-0", c.incarnation)
        assert env.body == g
        for a, b in zip(g.responses, env.body.responses):
            assert bytes(a.behav_logp.data) == bytes(b.behav_logp.data)
    cnt = srv.counters()
    assert (cnt["received"], cnt["rejected"], cnt["duplicates"], cnt["lost"], cnt["uncredited"]) == (6, 0, 0, 0, 0)
    assert srv.metrics()["system/transport/received"] == 6.0


def test_no_credit_no_send_and_credit_flows_back_as_groups_are_consumed(server, client):
    srv = server(credit_window=2)
    c = client(srv)
    assert c.credits == 2
    assert c.send_group(make_group(0), timeout=5) and c.send_group(make_group(1), timeout=5)
    t0 = time.monotonic()
    assert not c.send_group(make_group(2), timeout=0.3)  # blocks, then reports "no credit"
    assert time.monotonic() - t0 >= 0.25
    assert not c.try_send_group(make_group(2))
    assert c.counters()["no_credit"] == 2 and c.groups_sent == 2
    # the learner has exactly the two credited groups and nothing else
    assert srv.recv_group(5).seq == 0
    assert c.send_group(make_group(2), timeout=5)  # consuming seq 0 returned a credit
    assert [srv.recv_group(5).seq for _ in range(2)] == [1, 2]
    assert srv.recv_group(0.3) is None
    cnt = srv.counters()
    assert cnt["received"] == 3 and cnt["uncredited"] == 0 and cnt["credits_granted"] >= 3


def test_duplicates_gaps_and_late_arrivals_are_counted(server):
    srv = server()
    d = raw_dealer(srv.trajectory_endpoint)
    g = make_group()
    for seq in (0, 1, 1, 3, 2, 6, 0):
        d.send(encode(make_envelope(g, "raw", "inc-1", seq)))
    got = []
    while (env := srv.recv_group(2)) is not None:
        got.append(env.seq)
    assert got == [0, 1, 3, 2, 6]
    cnt = srv.counters()
    # 1 and 0 repeated; 0->3 skipped 2 (arrived late), 3->6 skipped 4 and 5 (lost)
    assert (cnt["duplicates"], cnt["gaps"], cnt["late"], cnt["lost"], cnt["received"]) == (2, 2, 1, 2, 5)
    assert cnt["uncredited"] == 5  # it never said hello: accepted, but counted
    d.close()


def test_new_incarnation_is_accepted_and_closes_the_old_ones_accounting(server):
    srv = server()
    ctrl = raw_dealer(srv.control_endpoint)
    traj = raw_dealer(srv.trajectory_endpoint)
    g = make_group()
    ctrl.send(encode(make_envelope(Hello(policy_version=0), "a", "old", 0)))
    ctrl.send(encode(make_envelope(Heartbeat(policy_version=0, in_flight=0, groups_sent=5), "a", "old", 1)))
    for seq in range(3):  # seqs 3 and 4 never arrive
        traj.send(encode(make_envelope(g, "a", "old", seq)))
    assert [srv.recv_group(5).seq for _ in range(3)] == [0, 1, 2]
    assert srv.counters()["lost"] == 0
    ctrl.send(encode(make_envelope(Hello(policy_version=0), "a", "new", 0)))
    assert wait_until(lambda: srv.actor_info()["a"]["incarnation"] == "new")
    cnt = srv.counters()
    assert (cnt["incarnations"], cnt["closed_incarnations"], cnt["lost"], cnt["gaps"]) == (2, 1, 2, 1)
    traj.send(encode(make_envelope(g, "a", "new", 0)))
    env = srv.recv_group(5)
    assert (env.incarnation, env.seq) == ("new", 0)
    # a straggler of the old incarnation is still delivered, and un-counts one loss
    traj.send(encode(make_envelope(g, "a", "old", 3)))
    env = srv.recv_group(5)
    assert (env.incarnation, env.seq) == ("old", 3)
    cnt = srv.counters()
    assert (cnt["lost"], cnt["late"], cnt["received"]) == (1, 1, 5)
    ctrl.close()
    traj.close()


def test_client_rejoins_a_restarted_learner_as_a_new_incarnation(server, client):
    """The learner dies and a new instance binds the same addresses: the client notices the new
    instance, forgets the old one's state (credits, version, admission), sends and admits
    nothing until it rejoins, then starts afresh as a new incarnation: seqs from 0, credits
    from the new learner only (not the old incarnation's), nothing counted lost."""
    a = server(credit_window=4)
    c = client(a)
    a.publish_policy(5, "shm", "old")
    assert wait_until(lambda: c.latest_update is not None and c.latest_update.policy_version == 5)
    for i in range(3):
        assert c.send_group(make_group(seed=i, version=5), timeout=10)
    assert [a.recv_group(5).seq for _ in range(3)] == [0, 1, 2]
    old_inc = c.incarnation
    cfg = a.cfg.model_copy(update=dict(trajectory_addr=a.trajectory_endpoint, control_addr=a.control_endpoint))
    a.close()  # dies without a Shutdown; the client's heartbeats now go nowhere
    time.sleep(0.3)
    assert not c.rejoin_needed and c.admitted(5)  # it cannot know yet
    b = LearnerServer(cfg, max_staleness=1).start()
    try:
        b.publish_policy(3, "shm", "new")  # resumed from an older checkpoint
        assert wait_until(c.__class__.rejoin_needed.fget.__get__(c), timeout=10)
        assert c.learner_epoch == 1 and c.counters()["learner_restarts"] == 1
        assert c.latest_update.policy_version == 3 and c.latest_update.handle == "new"
        assert not c.admitted(5) and not c.admitted(3)
        with pytest.raises(LearnerRestarted):
            c.send_group(make_group(version=3), timeout=1)
        time.sleep(0.3)  # heartbeat replies for the old incarnation keep coming: ignored
        new_inc = c.rejoin()
        assert new_inc != old_inc and c.incarnation == new_inc and c.groups_sent == 0
        assert wait_until(lambda: c.admitted(3))
        assert not c.admitted(1)  # eta from the new learner: 3 - 1 > 1
        assert wait_until(lambda: c.credits == 4)  # the new learner's window, no more
        for i in range(2):
            assert c.send_group(make_group(seed=10 + i, version=3), timeout=10)
        envs = [b.recv_group(5) for _ in range(2)]
        assert [(e.incarnation, e.seq) for e in envs] == [(new_inc, 0), (new_inc, 1)]
        assert wait_until(lambda: b.actor_info()["actor-0"]["incarnation"] == new_inc)
        cnt = b.counters()
        assert (cnt["received"], cnt["lost"], cnt["gaps"], cnt["uncredited"]) == (2, 0, 0, 0)
        assert cnt["joined_midway"] <= 1  # the old incarnation's queued heartbeats, if they got there
        c._read_trajectory_socket()  # the dead learner's last credits, still queued, change nothing
        assert c.learner_epoch == 1 and not c.rejoin_needed
    finally:
        b.close()


def test_an_incarnation_first_heard_midway_is_not_charged_for_seqs_before(server):
    """Heartbeats and groups of an incarnation that talked to an earlier learner instance
    (no Hello here; groups_sent 500): accounting starts where this instance first hears of it."""
    srv = server()
    ctrl = raw_dealer(srv.control_endpoint)
    traj = raw_dealer(srv.trajectory_endpoint)
    g = make_group()
    ctrl.send(encode(make_envelope(Heartbeat(policy_version=0, in_flight=0, groups_sent=500), "a", "old", 7)))
    assert wait_until(lambda: "a" in srv.actor_info())
    for seq in (500, 502):  # 501 lost on the way: that one is this instance's loss
        traj.send(encode(make_envelope(g, "a", "old", seq)))
    assert [srv.recv_group(5).seq for _ in range(2)] == [500, 502]
    ctrl.send(encode(make_envelope(Heartbeat(policy_version=0, in_flight=0, groups_sent=503), "a", "old", 8)))
    ctrl.send(encode(make_envelope(Hello(policy_version=0), "a", "new", 0)))  # it rejoins
    assert wait_until(lambda: srv.actor_info()["a"]["incarnation"] == "new")
    cnt = srv.counters()
    assert (cnt["joined_midway"], cnt["lost"], cnt["gaps"], cnt["received"]) == (1, 1, 1, 2)
    ctrl.close()
    traj.close()


def test_heartbeats_make_liveness(server, client):
    srv = server(peer_timeout_s=0.5)
    quiet = client(srv, "quiet")
    polite = client(srv, "polite")
    assert wait_until(lambda: srv.alive_actors() == ["polite", "quiet"], 5)
    time.sleep(0.8)  # longer than the timeout: heartbeats keep them alive
    assert srv.alive_actors() == ["polite", "quiet"]
    polite.close(linger_s=0.3)  # goodbye: gone at once
    assert wait_until(lambda: "polite" not in srv.alive_actors(), 2)
    quiet.close(goodbye=False)  # silence: dead after peer_timeout_s
    assert "quiet" in srv.alive_actors()
    assert wait_until(lambda: srv.alive_actors() == [], 5)
    assert wait_until(lambda: srv.counters()["timeouts"] == 1, 2)  # the sweep that logs it runs every tick
    cnt = srv.counters()
    assert cnt["goodbyes"] == 1 and cnt["timeouts"] == 1 and cnt["alive_actors"] == 0
    assert srv.actor_info()["quiet"]["alive"] is False


def test_heartbeat_rtts_measure_the_reply_not_the_period(server, client):
    srv = server(heartbeat_s=0.5, peer_timeout_s=5.0)  # every heartbeat is answered with a Credit
    c = client(srv)
    assert wait_until(lambda: len(c.heartbeat_rtts()) >= 2, 5)
    rtts = c.heartbeat_rtts()
    beats = srv.counters()["heartbeats"]
    assert all(0.0 < r < 0.4 for r in rtts), rtts  # a loopback round trip, not the 0.5 s period
    assert len(rtts) <= beats + 1  # at most one sample per heartbeat


def test_admission_with_eta_and_a_late_joiner_learns_the_version(server, client):
    srv = server(max_staleness=1)
    early = client(srv, "early")
    assert early.learner_version == 0 and early.max_staleness == 1
    assert early.admitted(0)
    for v in (1, 2, 3):
        srv.publish_policy(v, backend="shm", handle=f"/dev/shm/policy-{v}", step=10 * v)
    assert early.wait_policy_update(2, timeout=5).handle == "/dev/shm/policy-3"
    assert early.learner_version == 3
    assert not early.admitted(1)               # 3 - 1 > eta
    assert early.admitted(2)                   # 3 - 2 <= eta
    assert not early.wait_admitted(1, timeout=0.3)
    threading.Timer(0.2, lambda: srv.publish_policy(4, "shm", "/dev/shm/policy-4")).start()
    assert early.wait_policy_update(3, timeout=5).policy_version == 4
    assert not early.admitted(2) and early.admitted(3)
    late = client(srv, "late", ready=False)     # joined after every broadcast
    assert not late.admitted(4) or late.learner_version == 4  # never admitted before it knows
    assert late.wait_admitted(4, timeout=5)     # waits for its first state from the learner
    assert late.learner_version == 4 and late.latest_update.handle == "/dev/shm/policy-4"
    assert late.admitted(3) and not late.admitted(2)
    with pytest.raises(ValueError):
        srv.publish_policy(4, "shm", "again")


def test_capacity_admission_exact_for_one_actor_whatever_its_heartbeats_say(server, client):
    srv = server()
    a = client(srv, "a")
    assert a.admit_room(0) is None               # no budget set: the version rule alone
    srv.set_admission(6)
    assert wait_until(lambda: a.admit_room(0) == 6)
    # it starts 4 and sends 2 (its heartbeat says started=4); the learner takes both
    a.set_state(groups_started=4)
    assert wait_until(lambda: srv._incs[("a", a.incarnation)].started == 4)
    for i in range(2):
        assert a.send_group(make_group(i), timeout=5)
    assert [srv.recv_group(5).seq for _ in range(2)] == [0, 1]
    # one kept (budget 6 -> 5), one filtered (no room used): admit = budget + dropped + taken = 5 + 0 + 2
    srv.set_admission(5)
    assert wait_until(lambda: a.admit_room(4) == 3)  # 7 - 4 started: 2 outstanding, room 3
    # a dropped group (verifier error) frees its room once reported
    a.set_state(groups_dropped=1)
    assert wait_until(lambda: a.admit_room(4) == 4)
    srv.set_admission(0)
    assert wait_until(lambda: a.admit_room(4) == 0)
    assert not a.wait_admit_room(4, timeout=0.2)
    threading.Timer(0.2, lambda: srv.set_admission(3)).start()
    assert a.wait_admit_room(4, timeout=5) and a.admit_room(4) == 2  # admit 3 + 1 dropped + 2 taken = 6; 6 - 4 started
    srv.set_admission(None)
    assert wait_until(lambda: a.admit_room(4) is None)


def test_capacity_admission_is_shared_by_generating_actors_only(server, client):
    srv = server()
    srv.set_admission(7)
    a, b = client(srv, "a"), client(srv, "b")
    ev = client(srv, "evaluator", generates=False)
    # room 7 over two generating actors: 4 to the first by id, 3 to the other; none to the evaluator
    assert wait_until(lambda: (a.admit_room(0), b.admit_room(0)) == (4, 3))
    assert ev.admit_room(0) is None
    b.set_state(groups_started=3)  # b's 3 outstanding leave room 4: a 2, b 3 + 2
    assert wait_until(lambda: (a.admit_room(0), b.admit_room(3)) == (2, 2))
    b.close(linger_s=0.5)          # b leaves: its outstanding groups free their room again
    assert wait_until(lambda: a.admit_room(0) == 7)


def test_shutdown_reaches_every_actor_including_late_ones(server, client):
    srv = server()
    a, b = client(srv, "a"), client(srv, "b")
    srv.shutdown("run finished")
    assert a.wait_shutdown(5) and b.wait_shutdown(5)
    assert a.shutdown_reason == "run finished"
    with pytest.raises(ShutdownRequested):
        a.send_group(make_group())
    assert not a.admitted(10)
    late = client(srv, "late", ready=False)
    assert late.wait_shutdown(5)


def test_actor_blocked_on_credit_is_released_by_shutdown(server, client):
    srv = server(credit_window=1)
    c = client(srv)
    assert c.send_group(make_group(), timeout=5)
    threading.Timer(0.3, lambda: srv.shutdown("stop")).start()
    with pytest.raises(ShutdownRequested):
        c.send_group(make_group(), timeout=10)


# ---------------------------------------------------------------------------- fuzz


def fuzz_messages(n: int, seed: int = 0):
    """>= n invalid single-frame messages: random bytes, byte-mutated and field-mutated
    valid envelopes, wrong versions, NaN log-probs, mismatched lengths, unknown fields,
    over-size. The expected reason of each comes from the reference decoder; none of them
    is valid (those are re-drawn), and each claims an identity the receiver has never
    seen, so none is attributed to a live actor's sequence."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    base_groups = [make_group(seed=i, k=1 + i % 4, length=4 + i) for i in range(8)]

    def valid_dict(i):
        env = make_envelope(base_groups[i % 8], f"fuzz-{i % 13}", f"inc-{i}", i)
        return msgspec.to_builtins(env, builtin_types=(bytes,))

    def r0(d):
        return d["body"]["responses"][0]

    def lp(n_, bad):
        x = -nrng.exponential(1.0, n_).astype(np.float32)
        x[rng.randrange(n_)] = bad
        return x.tobytes()

    field_mutations = [
        lambda d: d.update(schema_version=rng.choice([0, SCHEMA_VERSION - 1, SCHEMA_VERSION + 1, 99, -1])),
        lambda d: d.update(schema_version=SCHEMA_VERSION + 1, shiny_new_field=True),
        lambda d: r0(d)["behav_logp"].update(data=lp(r0(d)["token_ids"]["shape"][0], np.nan)),
        lambda d: r0(d)["behav_logp"].update(data=lp(r0(d)["token_ids"]["shape"][0], rng.choice([np.inf, -np.inf]))),
        lambda d: r0(d)["behav_logp"].update(data=lp(r0(d)["token_ids"]["shape"][0], rng.uniform(0.01, 5))),
        lambda d: r0(d)["token_ids"].update(data=r0(d)["token_ids"]["data"][:-4], shape=[r0(d)["token_ids"]["shape"][0] - 1]),
        lambda d: r0(d)["token_ids"].update(data=r0(d)["token_ids"]["data"][: rng.randrange(len(r0(d)["token_ids"]["data"]))]),
        lambda d: r0(d).update(outcome_reward=rng.choice([1.01, -0.5, float("nan"), 1e9])),
        lambda d: d["body"].update(responses=[]),
        lambda d: d.update(**{f"unknown_{rng.randrange(100)}": rng.randrange(100)}),
        lambda d: r0(d).update(extra_field=b"x"),
        lambda d: d["body"].update(kind=rng.choice(["grp", "", "TrajectoryGroup"])),
        lambda d: d.pop(rng.choice(["seq", "actor_id", "body", "sent_at"])),
        lambda d: d.update(seq=rng.choice(["1", 1.5, None, [1], -3])),
        lambda d: r0(d)["token_ids"].update(dtype=rng.choice(["int64", "float32", "str", ""])),
        lambda d: r0(d)["policy_version"].update(shape=[2, 2]),
        lambda d: d.update(body=rng.choice([None, 1, "x", [], {}])),
    ]
    out = []
    while len(out) < n:
        i = len(out)
        kind = i % 5
        if kind == 0:      # random bytes, random length
            msg = rng.randbytes(rng.randrange(0, 300))
        elif kind == 1:    # a valid envelope with a few bytes flipped / cut / spliced
            raw = bytearray(encode(msgspec.msgpack.decode(msgspec.msgpack.encode(valid_dict(i)), type=Envelope)))
            op = rng.randrange(3)
            if op == 0:
                for _ in range(rng.randrange(1, 4)):
                    raw[rng.randrange(len(raw))] = rng.randrange(256)
            elif op == 1:
                raw = raw[: rng.randrange(len(raw))]
            else:
                pos = rng.randrange(len(raw))
                raw[pos:pos] = rng.randbytes(rng.randrange(1, 8))
            msg = bytes(raw)
        elif kind == 4 and i % 50 == 4:  # over-size (the test's receiver allows 64 kB)
            msg = b"\x00" * (70_000 + rng.randrange(1000))
        else:              # a structured mutation of the fields
            d = valid_dict(i)
            rng.choice(field_mutations)(d)
            msg = msgspec.msgpack.encode(d)
        try:
            env = S.decode(msg, max_bytes=65_536)
        except ProtocolError as e:
            out.append((msg, e.reason))
            continue
        if type(env.body) not in (TrajectoryGroup, Goodbye):
            out.append((msg, "unexpected_kind"))
        # else: the mutation left it valid; draw another
    return out


def test_fuzz_10k_invalid_messages_against_a_live_receiver(server, client):
    srv = server(max_message_bytes=65_536)
    msgs = fuzz_messages(10_000)
    assert len(msgs) >= 10_000
    expected = {}
    for _, reason in msgs:
        expected[reason] = expected.get(reason, 0) + 1
    assert len(expected) >= 12, expected  # the mix covers most reasons
    # frames the wire format does not allow: several frames, or a learner message
    extra_frames = [[b"a", b"b"], [encode(make_envelope(make_group(), "x", "y", 0)), b""]]
    wrong_kind = [encode(make_envelope(Credit(n=1, granted_total=1, policy_version=0, max_staleness=0), "x", "y", 0))]
    control_junk = [os.urandom(32) for _ in range(200)] + [encode(make_envelope(make_group(), "x", "y", 0))]

    # the learner's receive loop runs while the junk streams in
    accepted, stop = [], threading.Event()

    def learner_loop():
        while not stop.is_set():
            env = srv.recv_group(0.1)
            if env is not None:
                accepted.append(env)

    reader = threading.Thread(target=learner_loop)
    reader.start()
    traj = raw_dealer(srv.trajectory_endpoint)
    ctrl = raw_dealer(srv.control_endpoint)
    try:
        for msg, _ in msgs:
            traj.send(msg)
        for frames in extra_frames:
            traj.send_multipart(frames)
        for msg in wrong_kind:
            traj.send(msg)
        for msg in control_junk:
            ctrl.send(msg)
        total_traj = len(msgs) + len(extra_frames) + len(wrong_kind)
        assert wait_until(lambda: srv.counters()["rejected_trajectory"] >= total_traj, 90)
        assert wait_until(lambda: srv.counters()["rejected_control"] >= len(control_junk), 10)
        time.sleep(0.2)
    finally:
        stop.set()
        reader.join()
    assert accepted == []
    cnt = srv.counters()
    assert cnt["received"] == 0
    assert cnt["rejected_trajectory"] == total_traj
    assert cnt["rejected_control"] == len(control_junk)
    assert cnt["rejected"] == total_traj + len(control_junk)
    got = {k.split("/", 1)[1]: v for k, v in cnt.items() if k.startswith("rejected/")}
    want = dict(expected)
    want["bad_frames"] = want.get("bad_frames", 0) + len(extra_frames)
    want["unexpected_kind"] = want.get("unexpected_kind", 0) + len(wrong_kind) + 1  # + the group on control
    ctrl_reasons = {}
    for m in control_junk[:-1]:
        try:
            S.decode(m)
        except ProtocolError as e:
            ctrl_reasons[e.reason] = ctrl_reasons.get(e.reason, 0) + 1
    for r, n in ctrl_reasons.items():
        want[r] = want.get(r, 0) + n
    assert got == want
    assert (cnt["duplicates"], cnt["lost"], cnt["gaps"]) == (0, 0, 0)

    c = client(srv, "honest")
    g = make_group(seed=99)
    assert c.send_group(g, timeout=10)
    env = srv.recv_group(10)
    assert env is not None and env.body == g and env.actor_id == "honest"
    traj.close()
    ctrl.close()


# ------------------------------------------------------------------ killed actor

ACTOR_SCRIPT = r"""
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
from common.config import TransportConfig
from common.schema import Int32Vector, Response, TrajectoryGroup
from common.transport import ActorClient

cfg = TransportConfig(trajectory_addr={traj!r}, control_addr={ctrl!r}, heartbeat_s=0.05, peer_timeout_s=5.0)
n = int(sys.argv[1])
rng = np.random.default_rng(0)
with ActorClient(cfg, "worker") as c:
    print("incarnation", c.incarnation, flush=True)
    seq = 0
    while n < 0 or seq < n:
        r = [Response.from_numpy(rng.integers(0, 1000, 64), -rng.random(64).astype(np.float32), 0, "stop", 1.0, "ok")
             for _ in range(4)]
        g = TrajectoryGroup(f"p{{seq}}", Int32Vector.from_numpy([1, 2, 3]), r, 0, 0.01, 0.01)
        c.send_group(g)
        seq += 1
        print("sent", seq, flush=True)
"""


def spawn_actor(srv, n):
    script = ACTOR_SCRIPT.format(root=str(ROOT), traj=srv.trajectory_endpoint, ctrl=srv.control_endpoint)
    p = subprocess.Popen([sys.executable, "-c", script, str(n)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = p.stdout.readline()
    assert line.startswith("incarnation"), line
    return p, line.split()[1]


def test_sigkilled_actor_restarts_as_a_new_incarnation(server):
    srv = server(credit_window=4, peer_timeout_s=5.0)
    p1, inc1 = spawn_actor(srv, -1)  # streams until killed
    got = []
    try:
        while len(got) < 40:
            env = srv.recv_group(30)
            assert env is not None
            got.append(env)
            if len(got) % 3 == 0:
                time.sleep(0.01)  # a slow learner: the actor blocks on credit now and then
    finally:
        p1.send_signal(signal.SIGKILL)
        p1.wait()
    # drain whatever it had already put on the wire
    while (env := srv.recv_group(1.0)) is not None:
        got.append(env)
    assert all(e.incarnation == inc1 for e in got)
    seqs = [e.seq for e in got]
    assert seqs == list(range(len(seqs)))  # nothing dropped, duplicated or reordered
    assert srv.counters()["rejected"] == 0

    p2, inc2 = spawn_actor(srv, 10)
    got2 = [srv.recv_group(30) for _ in range(10)]
    assert srv.recv_group(1.0) is None  # reads its Goodbye (in order, after its last group) and acks it
    assert p2.wait(30) == 0
    assert [(e.incarnation, e.seq) for e in got2] == [(inc2, i) for i in range(10)]
    assert wait_until(lambda: srv.counters()["goodbyes"] == 1, 10)
    cnt = srv.counters()
    assert cnt["incarnations"] == 2 and cnt["closed_incarnations"] == 2
    assert cnt["received"] == len(got) + 10 and cnt["duplicates"] == 0 and cnt["rejected"] == 0
    # a loss can only be what the killed process had sent (within its credit) and the
    # learner never got; it is counted, and bounded by the credit window
    assert 0 <= cnt["lost"] <= 4 and cnt["gaps"] == (1 if cnt["lost"] else 0)
    assert srv.alive_actors() == []


# ---------------------------------------------------------------------------- CURVE


@pytest.fixture
def keys(tmp_path):
    d = {}
    for name in ("learner", "actor", "intruder"):
        pub, sec = zmq.auth.create_certificates(tmp_path, name)
        d[name] = (pub, sec)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "actor.key").write_bytes(Path(d["actor"][0]).read_bytes())
    d["allowed"] = str(allowed)
    return d


def test_curve_only_the_allowed_key_gets_through(server, client, keys):
    srv = server(curve_force=True, curve_secret_key=keys["learner"][1], curve_public_keys_dir=keys["allowed"])
    good = client(srv, "good", cfg=dict(curve_client_secret_key=keys["actor"][1], curve_server_public_key=keys["learner"][0]))
    g = make_group()
    assert good.send_group(g, timeout=10)
    env = srv.recv_group(10)
    assert env.body == g and env.actor_id == "good"

    bad = client(srv, "bad", ready=False,
                 cfg=dict(curve_client_secret_key=keys["intruder"][1], curve_server_public_key=keys["learner"][0]))
    assert not bad.wait_ready(1.5)
    assert not bad.send_group(make_group(), timeout=0.5)  # never even got a credit
    # a peer with no key at all, speaking plain ZMTP: its perfectly valid group goes nowhere
    plain = raw_dealer(srv.trajectory_endpoint)
    plain.send(encode(make_envelope(make_group(), "plain", "p", 0)))
    assert srv.recv_group(1.5) is None
    cnt = srv.counters()
    assert cnt["received"] == 1 and cnt["hellos"] == 1
    assert srv.alive_actors() == ["good"]
    assert wait_until(lambda: srv.counters()["auth_failures"] >= 1, 5)
    plain.close()
