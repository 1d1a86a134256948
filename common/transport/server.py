"""The learner's end of the transport (the package docstring, ``common.transport``, is the
contract): binds both channels, receives, decodes and accounts trajectory groups, grants
credits, shares the admission budget, tracks liveness and publishes versions and shutdown.
The sequence accounting itself is ``common.transport.ledger``; CURVE is ``security``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from common.admission import admit_total
from common.config import TransportConfig
from common.schema import (
    SCHEMA_VERSION,
    Ack,
    ActorMetrics,
    Credit,
    Envelope,
    Goodbye,
    Heartbeat,
    Hello,
    PolicyUpdate,
    ProtocolError,
    Shutdown,
    TrajectoryGroup,
    decode,
    decode_batch,
    encode,
    peek_identity,
)
from common.transport.base import _MONITOR_EVENTS, LEARNER_ID, TransportError, _drain, _Wakeup
from common.transport.ledger import Incarnation, Ledger
from common.transport.security import _server_curve_setup, curve_enabled

log = logging.getLogger(__name__)

_BATCH = 32                 # queued trajectory messages processed together
_NOBLOCK = int(zmq.NOBLOCK)


class LearnerServer:
    """The learner's end: binds both channels, receives and accounts trajectory groups,
    grants credits, tracks liveness, publishes versions/admission/shutdown.

    Use as a context manager or call ``start()``/``close()``. ``recv_group`` must be called
    from one thread; every other method is thread-safe.
    """

    def __init__(self, cfg: TransportConfig, *, max_staleness: int, policy_version: int = 0,
                 credit_window: int | None = None, admission_budget: int | None = None):
        if max_staleness < 0 or policy_version < 0:
            raise ValueError("max_staleness and policy_version must be >= 0")
        self.cfg = cfg
        self.max_staleness = int(max_staleness)
        self.window = int(credit_window or cfg.credit_window)
        # top up once the outstanding credit falls this low (batches grants for big windows)
        self._refill_at = self.window - max(1, self.window // 4)
        self.instance = uuid.uuid4().hex
        self.run_id = cfg.run_id or ""  # messages of another run are refused (and that actor told so)
        self._foreign: set[tuple[str, str]] = set()  # (actor_id, incarnation) of other runs, warned once
        self._lock = threading.Lock()
        self._policy_version = int(policy_version)
        self._latest_update: PolicyUpdate | None = None
        self._shutdown_reason: str | None = None
        self._admission_budget = admission_budget  # set_admission; None = version rule only
        self._c = collections.Counter()
        self._ledger = Ledger(self._c)     # sequence accounting; its dicts are read here too
        self._current = self._ledger.current
        self._incs = self._ledger.incs
        self._rejected = collections.Counter()
        self._out_seq = 0
        self._rcvtimeo = None
        self._ready: collections.deque = collections.deque()  # (envelope, record, routing id)
        self._started = False
        self._closed = False
        self.trajectory_endpoint: str | None = None
        self.control_endpoint: str | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "LearnerServer":
        if self._started:
            return self
        cfg = self.cfg
        curve = curve_enabled(cfg)
        keys = _server_curve_setup(cfg) if curve else None  # raises before anything binds
        self._ctx = zmq.Context()
        self._auth = None
        try:
            if keys:
                self._auth = ThreadAuthenticator(self._ctx)
                self._auth.start()
                self._auth.configure_curve(domain="*", location=str(keys[2]))
            self._traj = self._server_socket(cfg.trajectory_addr, keys)
            self._ctrl = self._server_socket(cfg.control_addr, keys)
            self.trajectory_endpoint = self._traj.getsockopt_string(zmq.LAST_ENDPOINT)
            self.control_endpoint = self._ctrl.getsockopt_string(zmq.LAST_ENDPOINT)
            self._monitors = [s.get_monitor_socket(_MONITOR_EVENTS) for s in (self._traj, self._ctrl)]
            self._wake = _Wakeup(self._ctx)
        except Exception:
            self._teardown()
            raise
        self._thread = threading.Thread(target=self._control_loop, name="learner-control", daemon=True)
        self._started = True
        self._thread.start()
        log.info("transport: learner bound trajectories %s, control %s (curve %s)",
                 self.trajectory_endpoint, self.control_endpoint, "on" if curve else "off")
        return self

    def _server_socket(self, addr: str, keys) -> zmq.Socket:
        s = self._ctx.socket(zmq.ROUTER)
        s.linger = 500
        # hard cap against memory abuse; messages between max_message_bytes and this are
        # still read, counted and rejected as too_large
        s.maxmsgsize = 4 * self.cfg.max_message_bytes + (1 << 20)
        try:
            if keys:
                s.curve_publickey, s.curve_secretkey = keys[0], keys[1]
                s.curve_server = True
            s.bind(addr)
        except Exception:
            s.close(linger=0)  # an unclosed socket would make the context's term() wait forever
            raise
        return s

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._wake.put(("stop",))
            self._thread.join(timeout=5.0)
        self._teardown()

    def _teardown(self) -> None:
        socks = [s for s in (getattr(self, "_traj", None), getattr(self, "_ctrl", None)) if s is not None]
        for s in socks:
            try:
                s.disable_monitor()
            except zmq.ZMQError:
                pass
        for m in getattr(self, "_monitors", []):
            m.close(linger=0)
        for s in socks:
            s.close()
        if getattr(self, "_wake", None) is not None:
            self._wake.close()
        if getattr(self, "_auth", None) is not None:
            self._auth.stop()
        if getattr(self, "_ctx", None) is not None:
            self._ctx.term()

    def __enter__(self) -> "LearnerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ trajectories

    def recv_group(self, timeout: float | None = None) -> Envelope | None:
        """The next valid trajectory group (an Envelope whose body is a TrajectoryGroup),
        or None after ``timeout`` seconds (None = wait forever). Consuming it tops up the
        sender's credit. Invalid frames are counted and skipped. Call from one thread.
        The arrays' ``data`` are read-only views of the received frame (zero-copy)."""
        if not self._started or self._closed:
            raise TransportError("server is not running")
        ready = self._ready
        if not ready:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not ready:
                if not self._receive_batch(deadline):
                    return None
        env, rec, ident = ready.popleft()
        self._consumed(env.seq, rec, ident)
        return env

    @property
    def pending(self) -> int:
        """Valid groups received and accounted but not yet returned by ``recv_group``."""
        return len(self._ready)

    def _reject(self, reason: str, channel: str) -> None:
        with self._lock:
            self._rejected[reason] += 1
            self._c[f"rejected_{channel}"] += 1

    def _receive_batch(self, deadline: float | None) -> bool:
        """Wait for one message, take whatever else is already queued (up to _BATCH), and
        process them together: decode each, check all their log-probs in one vectorised
        pass, then account them in arrival order. False on timeout."""
        sock = self._traj
        ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
        if ms != self._rcvtimeo:
            sock.rcvtimeo = self._rcvtimeo = ms
        recv = sock.recv
        try:
            head = recv()  # the routing id; blocks up to the deadline
        except zmq.Again:
            return False
        batch = []  # (routing id, message frame)
        while True:
            # a ROUTER message is [routing id, frames...] (a peer message has >= 1 frame, all
            # of them already here); ours have exactly one frame, kept zero-copy
            body = recv(copy=False)
            if not body.more:
                batch.append((head, body))
            else:
                while body.more:
                    body = recv(copy=False)
                self._reject("bad_frames", "trajectory")
            if len(batch) >= _BATCH:
                break
            try:
                head = recv(_NOBLOCK)
            except zmq.Again:
                break
        max_bytes = self.cfg.max_message_bytes
        bufs = [b.buffer for _, b in batch]
        try:
            results = decode_batch(bufs, max_bytes)
        except Exception:  # a decoder bug must not take the receiver down
            log.exception("transport: unexpected error decoding trajectory messages")
            results = []
            for buf in bufs:
                try:
                    results.append((decode(buf, max_bytes), None))
                except ProtocolError as e:
                    results.append((None, e))
                except Exception:
                    results.append((None, ProtocolError("internal_error")))
        now = time.monotonic()
        ready = self._ready
        n_ready = len(ready)
        refund = []
        acks = []
        incs = self._incs
        with self._lock:
            c = self._c
            last = None  # ((actor_id, incarnation), record) of the previous group: usually the same
            for (ident, frame), (env, err) in zip(batch, results):
                if env is not None and env.run_id != self.run_id and self.run_id:
                    env, err = None, ProtocolError("other_run")  # another run's actor on our address
                if env is not None:
                    body = env.body
                    if type(body) is TrajectoryGroup:
                        key = env.actor_id, env.incarnation
                        if last is not None and last[0] == key:
                            rec = last[1]
                        else:
                            rec = incs.get(key) or self._ledger.record(*key, promote=False)
                            last = (key, rec)
                        seq = env.seq
                        if not rec.announced and rec.received == 0 and seq > rec.next_seq:
                            self._ledger.joined_midway(rec, seq, group=True)
                        if seq == rec.next_seq:  # the common case, inline
                            rec.next_seq = seq + 1
                        elif not self._ledger.account(rec, seq):
                            continue
                        rec.received += 1
                        rec.last_seen = now
                        if seq >= rec.granted_total:
                            c["uncredited"] += 1
                        ready.append((env, rec, ident))
                        continue
                    if type(body) is not Goodbye:
                        env, err = None, ProtocolError("unexpected_kind")
                if env is None:
                    # rejected: counted by reason; in a known incarnation (the envelope is
                    # readable that far) its seq is accounted as received, not lost, and
                    # its credit returned
                    self._rejected[err.reason] += 1
                    c["rejected_trajectory"] += 1
                    who = (peek_identity(frame.buffer)
                           if err.reason not in ("too_large", "unexpected_kind", "other_run") else None)
                    rec = incs.get(who[:2]) if who is not None else None
                    if rec is not None and who[2] >= 0 and self._ledger.account(rec, who[2], count_duplicate=False):
                        refund.append((who[2], rec, ident))
                    continue
                else:  # Goodbye: after all of this incarnation's groups (same connection)
                    rec = self._ledger.record(env.actor_id, env.incarnation, promote=False)
                    if self._ledger.account(rec, env.seq):
                        if not rec.said_goodbye:
                            rec.said_goodbye = True
                            c["goodbyes"] += 1
                        rec.reported_sent = max(rec.reported_sent, body.groups_sent, env.seq)
                        self._ledger.close_incarnation(rec, "goodbye")
                    acks.append((env.seq, env.incarnation, ident))
            c["received"] += len(ready) - n_ready
        for seq, rec, ident in refund:
            self._consumed(seq, rec, ident)
        for seq, inc, ident in acks:  # the last thing this connection gets from us
            self._send_traj(ident, Ack(seq=seq, incarnation=inc))
        return True

    def _send_traj(self, ident, body) -> None:
        out = Envelope(SCHEMA_VERSION, LEARNER_ID, self.instance, 0, time.time(), body, self.run_id)
        try:
            self._traj.send_multipart([ident, encode(out, validate=False)], zmq.NOBLOCK)
        except zmq.Again:  # peer's queue full; a Credit is repeated by the next heartbeat reply
            pass

    def _consumed(self, seq: int, rec: Incarnation, ident) -> None:
        """Seq ``seq`` of ``rec`` is used up (the learner took it, or it was rejected): top
        the sender up with credit if it is running low, on the trajectory connection."""
        if seq >= rec.consumed_next:  # only this thread writes it; the control thread reads
            rec.consumed_next = seq + 1
        if rec.granted_total - rec.consumed_next > self._refill_at:
            return  # plenty left: the common case, no lock
        with self._lock:
            if (rec.granted_total - rec.consumed_next > self._refill_at or rec.closed or rec.identity is None
                    or self._shutdown_reason is not None or self._current.get(rec.actor_id) is not rec):
                return  # (no credit for an incarnation that never announced itself)
            credit = self._grant(rec)
        self._send_traj(ident, credit)
    # ----------------------------------------------------------------- control

    def publish_policy(self, policy_version: int, backend: str, handle: str, step: int = 0) -> None:
        """Announce a new policy version (must increase) to every actor, now and later."""
        upd = PolicyUpdate(policy_version=int(policy_version), backend=backend, handle=handle, step=int(step))
        with self._lock:
            if policy_version <= self._policy_version and self._latest_update is not None:
                raise ValueError(f"policy_version {policy_version} <= current {self._policy_version}")
            self._policy_version = int(policy_version)
            self._latest_update = upd
            self._c["policy_updates"] += 1
        self._wake.put(("broadcast",))

    def set_admission(self, budget: int | None) -> None:
        """Capacity-based admission (``common.admission`` rules 3–5): ``budget`` is how many
        more groups may be outstanding (started by actors, not yet taken by ``recv_group``),
        computed by ``Ingest``. The server shares ``budget − outstanding`` among the live
        generating actors and sends each its ``Credit.admit_total``; None lifts the bound
        (the version rule alone). Cheap: call it
        whenever the learner has handled the groups it took or advances its version; actors
        whose ``admit_total`` changed are told at once. The groups taken so far are
        snapshotted with the budget: a group taken by ``recv_group`` but not yet counted
        by the learner frees no room in between."""
        with self._lock:
            self._admission_budget = None if budget is None else max(int(budget), 0)
            for rec in self._current.values():
                rec.taken_at_budget = rec.consumed_next
        self._wake.put(("admission",))

    def shutdown(self, reason: str = "") -> None:
        """Tell every actor (including any that joins later) to shut down; no more credits."""
        with self._lock:
            self._shutdown_reason = reason
        self._wake.put(("broadcast",))

    @property
    def policy_version(self) -> int:
        return self._policy_version

    def alive_actors(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return sorted(a for a, r in self._current.items()
                          if not (r.closed or r.leaving) and now - r.last_seen <= self.cfg.peer_timeout_s)

    def actor_info(self) -> dict[str, dict]:
        """Per actor id: its current incarnation's state and accounting."""
        now = time.monotonic()
        with self._lock:
            return {
                a: dict(incarnation=r.incarnation,
                        alive=not (r.closed or r.leaving) and now - r.last_seen <= self.cfg.peer_timeout_s,
                        closed=r.closed_why or None, silent_s=now - r.last_seen, policy_version=r.policy_version,
                        in_flight=r.in_flight, groups_sent=r.reported_sent, received=r.received,
                        next_seq=r.next_seq, missing=len(r.missing) + r.untracked_lost,
                        granted_total=r.granted_total, metrics=dict(r.metrics))
                for a, r in self._current.items()
            }

    def counters(self) -> dict[str, int]:
        """Flat counters: received, duplicates, gaps, lost, late, uncredited, rejected (and
        rejected/<reason>), credits_granted, alive_actors, ..."""
        keys = ("received", "duplicates", "gaps", "lost", "late", "uncredited", "credits_granted",
                "hellos", "heartbeats", "incarnations", "closed_incarnations", "goodbyes", "timeouts",
                "policy_updates", "rejected_trajectory", "rejected_control", "auth_failures",
                "handshake_failures", "joined_midway")
        with self._lock:
            out = {k: self._c[k] for k in keys}
            out["rejected"] = sum(self._rejected.values())
            for reason, n in sorted(self._rejected.items()):
                out[f"rejected/{reason}"] = n
        out["alive_actors"] = len(self.alive_actors())
        out["policy_version"] = self._policy_version
        return out

    def metrics(self, prefix: str = "system/transport/") -> dict[str, float]:
        """``counters()`` under the learner's ``system/`` metrics namespace."""
        return {prefix + k: float(v) for k, v in self.counters().items()}

    # ------------------------------------------------------- control thread

    def _send(self, rec: Incarnation, bodies) -> None:
        if rec.identity is None:
            return
        for body in bodies:
            env = Envelope(SCHEMA_VERSION, LEARNER_ID, self.instance, self._out_seq, time.time(), body, self.run_id)
            self._out_seq += 1
            try:
                self._ctrl.send_multipart([rec.identity, encode(env, validate=False)], zmq.NOBLOCK)
            except zmq.Again:  # peer's queue full: state is re-sent with the next heartbeat
                pass

    def _state(self, rec: Incarnation) -> list:
        """Messages telling ``rec`` the current state; grants credit up to the window.
        Caller holds the lock."""
        if self._shutdown_reason is not None:
            return [Shutdown(reason=self._shutdown_reason)]
        out = []
        if self._latest_update is not None:
            out.append(self._latest_update)
        out.append(self._grant(rec))
        return out

    def _grant(self, rec: Incarnation) -> Credit:
        """Top ``rec`` up to ``window`` credits beyond the last seq the learner took; the
        Credit to send. Caller holds the lock."""
        n = 0
        if not rec.closed and self._shutdown_reason is None and self._current.get(rec.actor_id) is rec:
            target = rec.consumed_next + self.window
            if target > rec.granted_total:
                n = target - rec.granted_total
                rec.granted_total = target
                self._c["credits_granted"] += n
        admit = self._admit_total(rec)
        rec.admit_sent = admit
        return Credit(n=n, granted_total=rec.granted_total, policy_version=self._policy_version,
                      max_staleness=self.max_staleness, admit_total=admit, incarnation=rec.incarnation)

    def _control_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._ctrl, zmq.POLLIN)
        poller.register(self._wake.rx, zmq.POLLIN)
        for m in self._monitors:
            poller.register(m, zmq.POLLIN)
        tick = min(0.25, self.cfg.peer_timeout_s / 4)
        next_sweep = time.monotonic()
        while True:
            try:
                events = dict(poller.poll(int(tick * 1000)))
                if self._wake.rx in events or self._wake.queue:
                    for cmd in self._wake.drain():
                        if cmd[0] == "stop":
                            return
                        self._on_command(cmd)
                if self._ctrl in events:
                    for frames in _drain(self._ctrl):
                        self._on_control(frames)
                for m in self._monitors:
                    if m in events:
                        self._on_monitor(m)
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + tick
            except Exception:  # never let the control thread die
                log.exception("transport: learner control loop error")
                time.sleep(0.01)

    def _on_command(self, cmd) -> None:
        if cmd[0] == "broadcast":
            with self._lock:
                targets = [(r, self._state(r)) for r in self._current.values() if not r.closed]
            for rec, msgs in targets:
                self._send(rec, msgs)
        elif cmd[0] == "admission":
            with self._lock:
                if self._shutdown_reason is not None:
                    return
                targets = [(r, [self._grant(r)]) for r in self._generating()
                           if self._admit_total(r) != r.admit_sent]
            for rec, msgs in targets:
                self._send(rec, msgs)

    def _generating(self) -> list[Incarnation]:
        """Live incarnations that start groups, in actor-id order. Caller holds the lock."""
        return sorted((r for r in self._current.values() if r.generates and not (r.closed or r.leaving)),
                      key=lambda r: r.actor_id)

    def _admit_total(self, rec: Incarnation) -> int | None:
        """The cumulative number of groups ``rec`` may have started (``common.admission``
        rule 5; taken = seqs consumed as of the budget's snapshot); None without a budget.
        Caller holds the lock."""
        if self._admission_budget is None or not rec.generates:
            return None
        gens = self._generating()
        if rec not in gens:
            return rec.started
        return admit_total(self._admission_budget, [r.started for r in gens], [r.dropped for r in gens],
                           [r.taken_at_budget for r in gens], gens.index(rec))

    def _on_control(self, frames) -> None:
        if len(frames) != 2:
            self._reject("bad_frames", "control")
            return
        ident, payload = frames
        try:
            env = decode(payload, self.cfg.max_message_bytes)
        except ProtocolError as e:
            self._reject(e.reason, "control")
            return
        except Exception:
            log.exception("transport: unexpected error decoding a control message")
            self._reject("internal_error", "control")
            return
        if env.run_id != self.run_id and self.run_id:
            self._refuse_other_run(ident, env)
            return
        body = env.body
        kind = type(body)
        if kind not in (Hello, Heartbeat, ActorMetrics, Goodbye):
            self._reject("unexpected_kind", "control")
            return
        now = time.monotonic()
        reply = []
        with self._lock:
            key = (env.actor_id, env.incarnation)
            rec = self._incs.get(key)
            if kind is Hello:
                self._c["hellos"] += 1
                rec = self._ledger.record(*key, promote=True)
                rec.generates = body.generates
                rec.announced = True
            elif kind is Heartbeat:
                self._c["heartbeats"] += 1
                if rec is None:  # its Hello was lost, or it talked to an earlier learner instance:
                    rec = self._ledger.record(*key, promote=True)  # a heartbeat announces it as well
                    if body.groups_sent > 0:
                        self._ledger.joined_midway(rec, body.groups_sent, group=False)
            elif rec is None:
                return
            rec.identity = bytes(ident)
            rec.last_seen = now
            if kind is ActorMetrics:
                rec.metrics.update(body.metrics)
                return
            if kind is Goodbye:  # leaving: not alive from now on; the accounting closes
                rec.alive = False  # with the Goodbye that follows its last group in order
                rec.leaving = True
                rec.reported_sent = max(rec.reported_sent, body.groups_sent)
                if not rec.said_goodbye:
                    rec.said_goodbye = True
                    self._c["goodbyes"] += 1
                return
            rec.policy_version = body.policy_version
            if kind is Heartbeat:
                rec.in_flight = body.in_flight
                rec.started, rec.dropped = body.groups_started, body.groups_dropped
                rec.metrics.update(body.metrics)
                if body.groups_sent > rec.reported_sent:
                    rec.reported_sent = body.groups_sent
                    start = max(rec.next_seq, rec.count_from)
                    if rec.closed and rec.reported_sent > start:  # loss it has only now reported
                        self._ledger.mark_lost(rec, start, rec.reported_sent)
                        rec.next_seq = rec.reported_sent
            if not rec.alive and not (rec.closed or rec.leaving):
                rec.alive = True
                log.info("transport: actor %s (incarnation %s) is alive", rec.actor_id, rec.incarnation[:8])
            if self._current.get(rec.actor_id) is rec and not rec.closed:
                reply = self._state(rec)
            elif self._shutdown_reason is not None:
                reply = [Shutdown(reason=self._shutdown_reason)]
        self._send(rec, reply)

    def _refuse_other_run(self, ident, env) -> None:
        """A control message of another run (e.g. a second run on this host and port): counted,
        never recorded, and answered with a Shutdown that names both runs."""
        self._reject("other_run", "control")
        key = (env.actor_id, env.incarnation)
        if key not in self._foreign:
            self._foreign.add(key)
            log.warning("transport: refused actor %s of run %r (this learner runs %r)", env.actor_id,
                        env.run_id, self.run_id)
        reason = (f"this learner belongs to run {self.run_id!r}, not to {env.run_id!r}: another run holds "
                  f"{self.control_endpoint}; give this run other transport addresses")
        out = Envelope(SCHEMA_VERSION, LEARNER_ID, self.instance, 0, time.time(), Shutdown(reason=reason[:256]),
                       self.run_id)
        try:
            self._ctrl.send_multipart([bytes(ident), encode(out, validate=False)], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _on_monitor(self, m: zmq.Socket) -> None:
        while True:
            try:
                evt = recv_monitor_message(m, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            with self._lock:
                if evt["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self._c["auth_failures"] += 1
                else:
                    self._c["handshake_failures"] += 1

    def _sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            for rec in self._current.values():
                if rec.alive and now - rec.last_seen > self.cfg.peer_timeout_s:
                    rec.alive = False
                    self._c["timeouts"] += 1
                    log.warning("transport: actor %s silent for %.1f s: dead", rec.actor_id, now - rec.last_seen)
