"""An actor's end of the transport (the package docstring, ``common.transport``, is the
contract): sends trajectory groups under credit, heartbeats, follows the learner's policy
versions, admission bound and shutdown, and rejoins a restarted learner as a new incarnation.
"""

from __future__ import annotations

import collections
import logging
import os
import socket as _socket
import threading
import time
import uuid

import zmq

from common.admission import version_admitted
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
    encode,
    encode_into,
)
from common.transport.base import LearnerRestarted, ShutdownRequested, TransportError, _drain, _Wakeup
from common.transport.security import _client_curve_setup, curve_enabled

log = logging.getLogger(__name__)


class ActorClient:
    """An actor's end: sends trajectory groups under credit, heartbeats, and follows the
    learner's policy versions, admission bound and shutdown.

    ``send_group`` and ``close`` must be called from one thread (they own the trajectory
    socket); everything else is thread-safe. A new ``ActorClient`` is a new incarnation
    (fresh uuid, seq from 0). ``validate_on_send`` runs the receiver's full checks before
    sending (the learner validates every group anyway and counts rejections by reason).
    """

    def __init__(self, cfg: TransportConfig, actor_id: str, *, policy_version: int = 0,
                 validate_on_send: bool = False, generates: bool = True):
        self.cfg = cfg
        self.actor_id = actor_id
        self.incarnation = uuid.uuid4().hex
        self.run_id = cfg.run_id or ""
        self.validate_on_send = validate_on_send
        self.generates = bool(generates)  # False: follows versions only (takes no share of admission)
        self._cond = threading.Condition()
        self._admit_total: int | None = None  # Credit.admit_total (None: no capacity bound)
        self._groups_started = 0   # groups started / dropped, reported by heartbeats
        self._groups_dropped = 0
        self._granted = 0          # cumulative credit (only grows)
        self._sent = 0             # trajectory envelopes sent (= next seq); caller thread only
        self._caller_waiting = False
        self._wait_s = 0.0         # total time send_group waited for credit
        self._acked = -1           # highest trajectory seq the learner acknowledged
        self._buf = bytearray()  # encode buffer, reused for every group
        self._learner_version: int | None = None
        self._eta: int | None = None
        self._latest_update: PolicyUpdate | None = None
        self._shutdown_reason: str | None = None
        self._learner_instance: str | None = None
        self._learner_epoch = 0    # learner instances seen after the first
        self._past_instances: collections.deque = collections.deque(maxlen=16)  # replaced ones
        self._rejoin_needed = False  # a new learner instance: the caller must rejoin()
        self._learner_seen = 0.0
        self._policy_version = int(policy_version)
        self._in_flight = 0
        self._metrics: dict[str, float] = {}
        self._ctrl_seq = 0
        self._c = collections.Counter()
        self._hb_sent: float | None = None  # monotonic time of the heartbeat awaiting a Credit
        self._hb_rtts: collections.deque = collections.deque(maxlen=1024)
        self._started = False
        self._closed = False

    def start(self) -> "ActorClient":
        if self._started:
            return self
        keys = _client_curve_setup(self.cfg) if curve_enabled(self.cfg) else None
        self._ctx = zmq.Context()
        self._traj = self._client_socket(self.cfg.trajectory_addr, keys)
        self._ctrl = self._client_socket(self.cfg.control_addr, keys)
        self._wake = _Wakeup(self._ctx)         # caller threads -> control thread
        self._caller_wake = _Wakeup(self._ctx)  # control thread -> the thread in send_group
        self._poller = zmq.Poller()
        self._poller.register(self._traj, zmq.POLLIN)
        self._poller.register(self._caller_wake.rx, zmq.POLLIN)
        self._thread = threading.Thread(target=self._control_loop, name=f"actor-{self.actor_id}-control", daemon=True)
        self._started = True
        self._thread.start()
        return self

    def _client_socket(self, addr: str, keys) -> zmq.Socket:
        s = self._ctx.socket(zmq.DEALER)
        s.linger = 0
        if keys:
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = keys
        s.connect(addr)
        return s

    def close(self, goodbye: bool = True, reason: str = "", linger_s: float = 2.0) -> None:
        """Stop. With ``goodbye`` a Goodbye follows the last group and the client waits up
        to ``linger_s`` for the learner's Ack of it, so the learner has read every group
        and closes this incarnation's accounting at once (no loss counted). Without it the
        learner notices by heartbeat timeout or by this actor's next incarnation."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return
        if goodbye:
            self._goodbye(reason, linger_s)
        self._wake.put(("stop",))
        self._thread.join(timeout=5.0)
        with self._cond:
            self._cond.notify_all()
        self._traj.close(linger=int(linger_s * 1000))
        self._ctrl.close(linger=0)
        self._wake.close()
        self._caller_wake.close()
        self._ctx.term()

    def _goodbye(self, reason: str, timeout_s: float) -> None:
        """Send Goodbye after the last group and wait (up to ``timeout_s``) for the
        learner's Ack: closing while the learner still writes to this connection would make
        the kernel reset it and discard groups the learner has not read yet."""
        seq = self._sent
        env = Envelope(SCHEMA_VERSION, self.actor_id, self.incarnation, seq, time.time(),
                       Goodbye(groups_sent=seq, reason=reason), self.run_id)
        self._traj.sndtimeo = max(0, int(timeout_s * 1000))
        try:
            self._traj.send(encode(env))
        except zmq.Again:
            return
        self._sent = seq + 1
        self._wake.put(("goodbye", Goodbye(groups_sent=seq, reason=reason)))  # liveness: at once
        self._acked = -1
        deadline = time.monotonic() + timeout_s
        while self._acked < seq:
            left = deadline - time.monotonic()
            if left <= 0 or not self._traj.poll(max(1, int(left * 1000))):
                log.debug("transport: no ack of goodbye from the learner within %.1f s", timeout_s)
                return
            self._read_trajectory_socket()

    def __enter__(self) -> "ActorClient":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ sending

    def send_group(self, group: TrajectoryGroup, timeout: float | None = None) -> bool:
        """Send one group once a credit is available. Returns False if no credit came within
        ``timeout`` seconds (0 = don't wait; None = wait forever). Raises ShutdownRequested
        once the learner asked to shut down; ProtocolError for a malformed group when
        ``validate_on_send``."""
        if type(group) is not TrajectoryGroup:
            raise TypeError("send_group takes a TrajectoryGroup")
        if not self._started or self._closed:
            raise TransportError("client is not running")
        if self._shutdown_reason is not None:
            raise ShutdownRequested(self._shutdown_reason)
        if self._rejoin_needed:
            raise LearnerRestarted("the learner restarted: rejoin() before sending")
        seq = self._sent
        if self._granted <= seq and not self._await_credit(timeout):
            with self._cond:
                self._c["no_credit"] += 1
            return False
        env = Envelope(SCHEMA_VERSION, self.actor_id, self.incarnation, seq, time.time(), group, self.run_id)
        encode_into(env, self._buf, self.validate_on_send)
        self._traj.send(self._buf)  # copied by zmq: the buffer is free again at once
        self._sent = seq + 1
        return True

    def try_send_group(self, group: TrajectoryGroup) -> bool:
        """Send only if a credit is available now."""
        return self.send_group(group, timeout=0)

    def _await_credit(self, timeout: float | None) -> bool:
        """Wait for a credit: read Credit top-ups from the trajectory socket, and wake-ups
        from the control thread (first grant, heartbeat replies, shutdown)."""
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        try:
            return self._await_credit_loop(deadline)
        finally:
            with self._cond:
                self._c["credit_waits"] += 1
                self._wait_s += time.monotonic() - t0

    def _await_credit_loop(self, deadline: float | None) -> bool:
        while True:
            self._read_trajectory_socket()
            self._caller_waiting = True  # set before the re-check: no lost wake-up
            self._caller_wake.drain()
            if self._shutdown_reason is not None:
                self._caller_waiting = False
                raise ShutdownRequested(self._shutdown_reason)
            if self._rejoin_needed:
                self._caller_waiting = False
                raise LearnerRestarted("the learner restarted while waiting for credit: rejoin()")
            if self._granted > self._sent:
                self._caller_waiting = False
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self._caller_waiting = False
                return False
            self._poller.poll(1000 if left is None else min(1000, max(1, int(left * 1000 + 0.999))))

    def _read_trajectory_socket(self) -> None:
        for frames in _drain(self._traj):
            self._on_learner_message(frames)

    @property
    def credits(self) -> int:
        """Groups this actor may send now (as last heard; send_group reads new top-ups)."""
        return max(0, self._granted - self._sent)

    @property
    def groups_sent(self) -> int:
        return self._sent

    # ---------------------------------------------------------- admission etc.

    @property
    def learner_version(self) -> int | None:
        """The newest policy version the learner has announced (None before first contact)."""
        return self._learner_version

    @property
    def max_staleness(self) -> int | None:
        return self._eta

    @property
    def latest_update(self) -> PolicyUpdate | None:
        return self._latest_update

    @property
    def connected(self) -> bool:
        """Heard from the learner within peer_timeout_s."""
        return self._learner_seen > 0 and time.monotonic() - self._learner_seen <= self.cfg.peer_timeout_s

    def admitted(self, my_version: int) -> bool:
        """May a group be started with weights ``my_version``? (learner - mine <= eta;
        False before the learner's state has arrived and after shutdown)"""
        with self._cond:
            return self._admitted(my_version)

    def _admitted(self, my_version: int) -> bool:
        if self._shutdown_reason is not None or self._rejoin_needed:
            return False
        return version_admitted(self._learner_version, my_version, self._eta)

    def admit_room(self, started: int) -> int | None:
        """How many more groups may be started by an incarnation that has started
        ``started`` so far (the learner's capacity rule); None = no capacity bound."""
        with self._cond:
            return None if self._admit_total is None else max(self._admit_total - int(started), 0)

    def wait_admit_room(self, started: int, timeout: float | None = None) -> bool:
        """Block until ``admit_room(started)`` is positive (or unbounded); False on
        timeout, shutdown or close."""
        def room():
            return self._admit_total is None or self._admit_total > started

        with self._cond:
            self._cond.wait_for(lambda: room() or self._shutdown_reason is not None or self._closed
                                or self._rejoin_needed, timeout)
            return room() and self._shutdown_reason is None and not self._rejoin_needed

    def wait_admitted(self, my_version: int, timeout: float | None = None) -> bool:
        """Block until ``admitted(my_version)``; False on timeout or shutdown."""
        with self._cond:
            self._cond.wait_for(lambda: self._admitted(my_version) or self._shutdown_reason is not None
                                or self._closed or self._rejoin_needed, timeout)
            return self._admitted(my_version)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the learner's state (version, credits, eta) has arrived."""
        with self._cond:
            return self._cond.wait_for(lambda: self._eta is not None or self._shutdown_reason is not None, timeout)

    def wait_policy_update(self, newer_than: int, timeout: float | None = None) -> PolicyUpdate | None:
        """The latest PolicyUpdate once its version is > ``newer_than`` (None on timeout/shutdown)."""
        def ready():
            u = self._latest_update
            return ((u is not None and u.policy_version > newer_than) or self._shutdown_reason is not None
                    or self._rejoin_needed)
        with self._cond:
            self._cond.wait_for(ready, timeout)
            u = self._latest_update
            return u if u is not None and u.policy_version > newer_than else None

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown_reason is not None

    @property
    def shutdown_reason(self) -> str | None:
        return self._shutdown_reason

    def wait_shutdown(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._shutdown_reason is not None, timeout)

    # ------------------------------------------------------- learner restarts

    @property
    def rejoin_needed(self) -> bool:
        """A new learner instance has answered (the old one died and was restarted): this
        incarnation's credits, seqs and admission counts mean nothing to it. Until ``rejoin()``
        nothing is admitted, ``send_group`` raises ``LearnerRestarted`` and no heartbeat goes out."""
        return self._rejoin_needed

    @property
    def learner_epoch(self) -> int:
        """How many times the learner has been replaced by a new instance since first contact."""
        return self._learner_epoch

    def rejoin(self) -> str:
        """Become a new incarnation (fresh uuid, seq from 0, no credit, no groups started)
        and announce it to the current learner instance with a Hello; returns the new
        incarnation. Call from the thread that sends groups, with no group half-sent; the
        caller's cumulative counts (``set_state``) must restart from 0 as well."""
        with self._cond:
            self.incarnation = uuid.uuid4().hex
            self._sent, self._acked, self._granted = 0, -1, 0
            self._groups_started = self._groups_dropped = self._in_flight = 0
            self._admit_total, self._eta = None, None
            self._rejoin_needed = False
            self._c["rejoins"] += 1
            inc = self.incarnation
        log.info("transport: %s rejoins the restarted learner as incarnation %s", self.actor_id, inc[:8])
        self._wake.put(("hello",))
        return inc

    def set_state(self, policy_version: int | None = None, in_flight: int | None = None,
                  metrics: dict[str, float] | None = None, groups_started: int | None = None,
                  groups_dropped: int | None = None) -> None:
        """State reported by the next heartbeat (weights held, groups in flight, metrics,
        groups started and dropped: cumulative, for the learner's admission accounting)."""
        with self._cond:
            if groups_started is not None:
                self._groups_started = int(groups_started)
            if groups_dropped is not None:
                self._groups_dropped = int(groups_dropped)
            if policy_version is not None:
                self._policy_version = int(policy_version)
            if in_flight is not None:
                self._in_flight = int(in_flight)
            if metrics is not None:
                self._metrics.update({k: float(v) for k, v in metrics.items()})

    def send_metrics(self, metrics: dict[str, float]) -> None:
        """Send metrics to the learner now (control channel)."""
        self._wake.put(("metrics", {k: float(v) for k, v in metrics.items()}))

    def heartbeat_rtts(self) -> list[float]:
        """Control-plane latency: seconds from each heartbeat (the last 1024) to the next
        Credit this client received (the learner's reply, or a push that crossed it)."""
        with self._cond:
            return list(self._hb_rtts)

    def counters(self) -> dict[str, int]:
        with self._cond:
            out = dict(self._c)
        out.update(groups_sent=self._sent, credits=self.credits, granted_total=self._granted,
                   credit_wait_s=self._wait_s)
        return out

    # ------------------------------------------------------- control thread

    def _ctrl_send(self, body) -> None:
        with self._cond:
            inc = self.incarnation
        env = Envelope(SCHEMA_VERSION, self.actor_id, inc, self._ctrl_seq, time.time(), body, self.run_id)
        self._ctrl_seq += 1
        try:
            self._ctrl.send(encode(env), zmq.NOBLOCK)
        except zmq.Again:
            self._c["control_send_dropped"] += 1

    def _heartbeat(self) -> Heartbeat:
        with self._cond:
            return Heartbeat(policy_version=self._policy_version, in_flight=self._in_flight,
                             groups_sent=self._sent, metrics=dict(self._metrics),
                             groups_started=self._groups_started, groups_dropped=self._groups_dropped)

    def _hello(self) -> Hello:
        with self._cond:
            return Hello(policy_version=self._policy_version, pid=os.getpid(), host=_socket.gethostname()[:256],
                         generates=self.generates)

    def _control_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._ctrl, zmq.POLLIN)
        poller.register(self._wake.rx, zmq.POLLIN)
        self._ctrl_send(self._hello())
        hb = self.cfg.heartbeat_s
        next_hb = time.monotonic() + hb
        while True:
            try:
                timeout = min(1.0, max(0.0, next_hb - time.monotonic()))
                events = dict(poller.poll(int(timeout * 1000) + 1))
                if self._wake.rx in events or self._wake.queue:
                    for cmd in self._wake.drain():
                        if cmd[0] == "stop":
                            return
                        if cmd[0] == "metrics":
                            self._ctrl_send(ActorMetrics(metrics=cmd[1]))
                        elif cmd[0] == "hello":  # a new incarnation (rejoin)
                            self._ctrl_send(self._hello())
                            next_hb = min(next_hb, time.monotonic() + hb)
                        elif cmd[0] == "goodbye":
                            self._ctrl_send(cmd[1])
                            hb = next_hb = float("inf")  # no heartbeats after goodbye
                if self._ctrl in events:
                    for frames in _drain(self._ctrl):
                        self._on_learner_message(frames)
                if time.monotonic() >= next_hb:
                    if not self._rejoin_needed:  # the old incarnation says nothing to a new learner
                        self._ctrl_send(self._heartbeat())
                        with self._cond:
                            self._hb_sent = self._hb_sent or time.monotonic()
                    next_hb = time.monotonic() + hb
            except Exception:
                log.exception("transport: actor control loop error")
                time.sleep(0.01)

    def _on_learner_message(self, frames) -> None:
        # runs in the control thread (control socket) or the caller (trajectory socket)
        if len(frames) != 1:
            with self._cond:
                self._c["rejected"] += 1
                self._c["rejected/bad_frames"] += 1
            return
        try:
            env = decode(frames[0], self.cfg.max_message_bytes)
        except ProtocolError as e:
            with self._cond:
                self._c["rejected"] += 1
                self._c[f"rejected/{e.reason}"] += 1
            return
        body = env.body
        kind = type(body)
        with self._cond:
            if env.run_id != self.run_id and (env.run_id and self.run_id):
                # another run's learner answers on our address: its weights and credits are not
                # ours; stop with a reason instead of training someone else's run
                self._c["rejected"] += 1
                self._c["rejected/other_run"] += 1
                if self._shutdown_reason is None:
                    self._shutdown_reason = (f"the learner at {self.cfg.control_addr} belongs to run {env.run_id!r}, "
                                             f"not to this actor's run {self.run_id!r}")
                    log.error("transport: %s", self._shutdown_reason)
                    self._cond.notify_all()
                return
            if env.incarnation in self._past_instances:  # a straggler from a replaced learner
                self._c["stale_learner_msgs"] += 1
                return
            self._learner_seen = time.monotonic()
            if self._learner_instance != env.incarnation:
                if self._learner_instance is not None:  # the learner restarted: forget its state
                    self._past_instances.append(self._learner_instance)
                    log.warning("transport: learner restarted (instance %s)", env.incarnation[:8])
                    self._c["learner_restarts"] += 1
                    self._learner_epoch += 1
                    self._rejoin_needed = True
                    self._learner_version = self._latest_update = None
                    self._eta = self._admit_total = None
                self._learner_instance = env.incarnation
            if kind in (Credit, Ack) and (body.incarnation not in (None, self.incarnation)
                                          or (kind is Credit and self._rejoin_needed)):
                self._c["stale_incarnation_msgs"] += 1  # meant for an incarnation this client left
            elif kind is Credit:
                self._granted = max(self._granted, body.granted_total)
                self._eta = body.max_staleness
                self._admit_total = body.admit_total
                self._learner_version = max(self._learner_version or 0, body.policy_version)
                self._c["credit_msgs"] += 1
                if self._hb_sent is not None:
                    self._hb_rtts.append(time.monotonic() - self._hb_sent)
                    self._hb_sent = None
            elif kind is PolicyUpdate:
                if self._latest_update is None or body.policy_version > self._latest_update.policy_version:
                    self._latest_update = body
                self._learner_version = max(self._learner_version or 0, body.policy_version)
            elif kind is Shutdown:
                if self._shutdown_reason is None:
                    log.info("transport: learner requested shutdown: %s", body.reason)
                self._shutdown_reason = body.reason
            elif kind is Ack:
                self._acked = max(self._acked, body.seq)
            else:
                self._c["rejected"] += 1
                self._c["rejected/unexpected_kind"] += 1
                return
            self._cond.notify_all()
        if self._caller_waiting and threading.current_thread() is self._thread:
            self._caller_wake.put(("wake",))
