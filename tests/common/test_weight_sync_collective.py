"""Weight sync over gloo between real processes (common/weight_sync/collective.py): members
join late and are caught up with the newest version at once; every version arrives in
order, bit-exact; a receiver SIGKILLed in the middle of an update, or SIGSTOPped, costs the
sender at most one update's deadline and is dropped, and comes back as a new member; a
checksum rejection fails one delivery only; a receiver outlives its sender and joins the
next one (a restarted learner). NCCL: the same on two GPUs (marked gpu)."""

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from common.weight_sync import WeightSyncError, collective, make_receiver, make_sender
from synthetic import free_port
from test_weight_sync import START, check_equal, expect, kill_later, model_state, to_device

DEADLINE = 3.0  # per-update deadline in the failure tests [s]
MARGIN = 3.0  # slack on a busy shared 2-core box [s]
CTX = mp.get_context("spawn")


def child_receiver(backend, kw, q, label):
    """Receives updates as they come and reports each: ("received", version, ok, joins)."""
    torch.set_num_threads(1)
    try:
        r = make_receiver(backend, label=label, **kw)
        q.put(("ready",))
        while True:
            v, tensors = r.receive(timeout_s=600)
            try:
                check_equal(tensors, model_state(v))
                ok = True
            except AssertionError as e:
                ok = repr(e)
            q.put(("received", v, ok, r.joins))
    except BaseException as e:  # noqa: BLE001
        q.put(("crash", repr(e)))


def child_sender(kw, q, cmds):
    """A sender (a learner): sends the version it is told; reports ("sent", v, receivers)."""
    torch.set_num_threads(1)
    try:
        s = make_sender("gloo", **kw)
        q.put(("ready",))
        while True:
            v = cmds.get(timeout=600)
            st = s.send(model_state(v), v)
            q.put(("sent", v, st.receivers))
    except BaseException as e:  # noqa: BLE001
        q.put(("crash", repr(e)))


def start_receiver(addr, label, **over):
    q = CTX.Queue()
    kw = dict(addr=addr, timeout_s=30, connect_timeout_s=START, **over)
    p = CTX.Process(target=child_receiver, args=("gloo", kw, q, label), daemon=True)
    p.start()
    return p, q


def wait_members(s, n, timeout=START):
    t0 = time.monotonic()
    while sum(m["state"] == "ready" for m in s.members()) < n:
        assert time.monotonic() - t0 < timeout, s.members()
        time.sleep(0.05)


def test_gloo_late_joiner_caught_up_then_every_version_in_order():
    addr = f"127.0.0.1:{free_port()}"
    s = make_sender("gloo", addr=addr, timeout_s=30, connect_timeout_s=START, bucket_mb=0.001)
    p = None
    try:
        st = s.send(model_state(0), 0)  # nobody there yet: the learner is not held
        assert st.receivers == 0 and st.seconds < 1.0
        p, q = start_receiver(addr, "late")
        expect(q, "ready")
        assert expect(q, "received") == (0, True, 1)  # caught up without another send
        for v in (1, 2, 7):
            st = s.send(model_state(v), v)
            assert (st.receivers, st.failed) == (1, 0) and st.buckets > 2  # several packed buckets
            assert expect(q, "received") == (v, True, 1)  # every version, in order, bit-exact
        assert s.counts["catch_ups"] == 1 and s.counts["dropped"] == 0
    finally:
        if p is not None:
            p.kill()
        s.close()


def test_gloo_receiver_killed_mid_update_is_dropped_within_deadline_and_a_new_one_rejoins(monkeypatch):
    addr = f"127.0.0.1:{free_port()}"
    s = make_sender("gloo", addr=addr, timeout_s=DEADLINE, connect_timeout_s=START, bucket_mb=0.001)
    p = p2 = None
    try:
        p, q = start_receiver(addr, "doomed")
        expect(q, "ready")
        wait_members(s, 1)
        assert s.send(model_state(1), 1).receivers == 1
        assert expect(q, "received")[:2] == (1, True)
        # the next update crawls bucket by bucket; the receiver is SIGKILLed inside it
        broadcast = collective._PairGroup.broadcast
        monkeypatch.setattr(collective._PairGroup, "broadcast",
                            lambda self, *a: (time.sleep(0.2), broadcast(self, *a))[1])
        kill_later(p, 0.7)
        t0 = time.monotonic()
        st = s.send(model_state(2, big=True), 2)
        elapsed = time.monotonic() - t0
        assert (st.receivers, st.failed) == (0, 1)
        assert elapsed <= DEADLINE + MARGIN, elapsed
        assert s.members() == [] and s.counts["dropped"] == 1
        monkeypatch.setattr(collective._PairGroup, "broadcast", broadcast)
        t0 = time.monotonic()
        assert s.send(model_state(3), 3).receivers == 0  # nobody holds it up now
        assert time.monotonic() - t0 < 1.0
        # the actor comes back (a new process, a new member) and gets the newest weights
        p2, q2 = start_receiver(addr, "reborn")
        expect(q2, "ready")
        assert expect(q2, "received") == (3, True, 1)
        assert s.send(model_state(4), 4).receivers == 1
        assert expect(q2, "received") == (4, True, 1)
    finally:
        for proc in (p, p2):
            if proc is not None:
                proc.kill()
        s.close()


def test_gloo_stopped_receiver_costs_one_deadline_then_rejoins_when_resumed():
    addr = f"127.0.0.1:{free_port()}"
    s = make_sender("gloo", addr=addr, timeout_s=DEADLINE, connect_timeout_s=START, liveness_s=60.0)
    procs = []
    try:
        (pa, qa), (pb, qb) = start_receiver(addr, "stalls"), start_receiver(addr, "steady")
        procs += [pa, pb]
        expect(qa, "ready"), expect(qb, "ready")
        wait_members(s, 2)
        assert s.send(model_state(1), 1).receivers == 2
        assert expect(qa, "received")[:2] == expect(qb, "received")[:2] == (1, True)
        os.kill(pa.pid, signal.SIGSTOP)  # a host that stalls
        t0 = time.monotonic()
        st = s.send(model_state(2), 2)
        assert (st.receivers, st.failed) == (1, 1)
        assert time.monotonic() - t0 <= DEADLINE + MARGIN
        assert expect(qb, "received") == (2, True, 1)  # the others are served
        os.kill(pa.pid, signal.SIGCONT)
        # resumed, it finds itself dropped, joins again as a new member and is caught up
        v, ok, joins = expect(qa, "received")
        assert (v, ok, joins) == (2, True, 2)
        wait_members(s, 2)
        assert s.send(model_state(3), 3).receivers == 2
        assert expect(qa, "received") == (3, True, 2) and expect(qb, "received") == (3, True, 1)
    finally:
        for proc in procs:
            try:
                os.kill(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            proc.kill()
        s.close()


def test_gloo_silent_member_is_dropped_by_heartbeat_before_any_update():
    addr = f"127.0.0.1:{free_port()}"
    s = make_sender("gloo", addr=addr, timeout_s=DEADLINE, connect_timeout_s=START, liveness_s=1.5)
    p = None
    try:
        p, q = start_receiver(addr, "silent")
        expect(q, "ready")
        wait_members(s, 1)
        os.kill(p.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        while s.members():
            assert time.monotonic() - t0 < 1.5 + MARGIN, s.members()
            time.sleep(0.05)
        t0 = time.monotonic()
        assert s.send(model_state(1), 1).receivers == 0
        assert time.monotonic() - t0 < 1.0  # no deadline spent on it
    finally:
        if p is not None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        s.close()


def test_gloo_checksum_rejection_fails_one_delivery_and_the_next_goes_through(monkeypatch):
    addr = f"127.0.0.1:{free_port()}"
    s = make_sender("gloo", addr=addr, timeout_s=20, connect_timeout_s=60, num_receivers=1)
    r = make_receiver("gloo", addr=addr, timeout_s=20, connect_timeout_s=60)
    verify, box = collective._verify, {}

    def flip_once(bufs, header, *a, **k):
        if not box.get("flipped"):
            box["flipped"] = True
            bufs[0][3] ^= 0x04
        return verify(bufs, header, *a, **k)

    monkeypatch.setattr(collective, "_verify", flip_once)
    try:
        st = s.send(model_state(1), 1)
        assert (st.receivers, st.failed) == (0, 1) and box["flipped"]
        assert r.updates == 0  # the damaged update is never handed out
        assert s.send(model_state(2), 2).receivers == 1  # the member stays and takes the next
        v, tensors = r.receive(timeout_s=20)
        assert v == 2 and r.joins == 1
        check_equal(tensors, model_state(2))
        with pytest.raises(ValueError, match="not newer"):
            s.send(model_state(2), 2)
    finally:
        r.close()
        s.close()


def test_gloo_receiver_outlives_its_sender_and_joins_the_next_one():
    addr = f"127.0.0.1:{free_port()}"
    r = make_receiver("gloo", addr=addr, timeout_s=DEADLINE, connect_timeout_s=START)
    procs = []
    try:
        for v_first in (5, 2):  # a restarted learner may resume at an older version
            q, cmds = CTX.Queue(), CTX.Queue()
            p = CTX.Process(target=child_sender, args=(dict(addr=addr, timeout_s=30, num_receivers=1,
                                                            connect_timeout_s=START), q, cmds), daemon=True)
            p.start()
            procs.append(p)
            expect(q, "ready")
            cmds.put(v_first)
            assert expect(q, "sent") == (v_first, 1)
            v, tensors = r.receive(timeout_s=START)
            assert v == v_first
            check_equal(tensors, model_state(v))
            p.kill()  # the learner dies
            p.join()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError):
            r.receive(timeout_s=DEADLINE)  # nothing new, and the sender is gone: an error, no hang
        assert time.monotonic() - t0 <= DEADLINE + MARGIN
        assert r.joins >= 2 and r.last_error
    finally:
        for p in procs:
            p.kill()
        r.close()


# ----------------------------------------------------------------------------- NCCL


def child_nccl_receiver(port, q):
    torch.cuda.set_device(1)
    try:
        r = make_receiver("nccl", timeout_s=30, connect_timeout_s=START, addr=f"127.0.0.1:{port}",
                          device="cuda:1")
        q.put(("ready",))
        while True:
            v, tensors = r.receive(timeout_s=600)
            check_equal({k: t.cpu() for k, t in tensors.items()}, model_state(v))
            q.put(("received", v, True))
    except BaseException as e:  # noqa: BLE001
        q.put(("crash", repr(e)))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_roundtrip_and_dead_receiver():
    port = free_port()
    q = CTX.Queue()
    p = CTX.Process(target=child_nccl_receiver, args=(port, q), daemon=True)
    p.start()
    s = make_sender("nccl", num_receivers=1, timeout_s=DEADLINE, connect_timeout_s=START,
                    addr=f"127.0.0.1:{port}", device="cuda:0", bucket_mb=0.01)
    try:
        expect(q, "ready")
        for v in (1, 2):
            assert s.send(to_device(model_state(v), "cuda:0"), v).receivers == 1
            assert expect(q, "received") == (v, True)
        kill_later(p, 0.5)
        time.sleep(1.0)
        t0 = time.monotonic()
        st = s.send(to_device(model_state(3), "cuda:0"), 3)
        assert st.receivers == 0 and time.monotonic() - t0 <= DEADLINE + MARGIN
    finally:
        p.kill()
        s.close()


def test_gloo_receiver_reuses_released_buffers_never_held_ones():
    addr = f"127.0.0.1:{free_port()}"
    s = make_sender("gloo", addr=addr, timeout_s=20, connect_timeout_s=60, num_receivers=1, bucket_mb=0.001)
    r = make_receiver("gloo", addr=addr, timeout_s=20, connect_timeout_s=60)
    try:
        s.send(model_state(1), 1)
        _, held = r.receive(timeout_s=20)  # kept by the caller through the later updates
        for v in range(2, 8):
            assert s.send(model_state(v), v).receivers == 1
            got_v, tensors = r.receive(timeout_s=20)
            assert got_v == v
            check_equal(tensors, model_state(v))
            del tensors
        check_equal(held, model_state(1))  # never overwritten
        assert len(r._sets) <= 3  # released sets were reused, not one new set per update
    finally:
        r.close()
        s.close()
