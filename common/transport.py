"""ZeroMQ transport between actors and the learner: trajectories one way, control the other.

Contract
--------
Sockets (the learner binds both, actors connect; every message is one ``common.schema``
Envelope in one frame):
- trajectory channel, ``transport.trajectory_addr``: learner ROUTER <-> actor DEALER.
  Actor -> learner: ``TrajectoryGroup``s, then a final ``Goodbye``; ``seq`` counts the
  envelopes an incarnation puts on this channel, from 0. Learner -> actor on the same
  connection: ``Credit`` top-ups as it consumes groups, and an ``Ack`` of the ``Goodbye``
  (the actor closes only after it, or after its linger: closing while the learner still
  writes there makes the kernel reset the connection and drop groups not yet read).
- control channel, ``transport.control_addr``: learner ROUTER <-> actor DEALER.
  Actor -> learner: ``Hello`` once, a ``Heartbeat`` every ``heartbeat_s`` (weights version,
  groups in flight, groups sent, metrics), optional ``ActorMetrics``, and a ``Goodbye`` on
  leaving. The learner answers every Hello/Heartbeat with its current state (the latest
  ``PolicyUpdate`` if any, and a ``Credit`` with the cumulative grant, its policy version
  and eta; or ``Shutdown``) and pushes ``PolicyUpdate``/``Credit``/``Shutdown`` to known
  actors when they change. A late joiner learns the current version, credits and eta from
  the reply to its Hello, not from a broadcast it missed (no PUB/SUB anywhere); a lost
  control message is repaired by the next heartbeat's reply.

Invariants
- Back-pressure: an actor never sends a group without a credit. ``Credit.granted_total`` is
  cumulative per incarnation; the actor may send while ``granted_total > groups_sent`` and
  otherwise blocks (or reports "no credit"). The learner grants up to ``credit_window``
  groups beyond the last seq ``recv_group`` handed out, topping up as it hands out more
  (a quarter window at a time), so an actor has at most ``credit_window`` groups queued.
- Admission: an actor may start a group only while ``learner_version - own_version <= eta``
  (``max_staleness``), using the newest version it has heard of; before it has heard from
  the learner, and after shutdown, it is not admitted. With a capacity budget
  (``set_admission``, AReaL's rule; the learner's ``Ingest`` computes it) it may also start
  only while its groups started stay below ``Credit.admit_total``: the server gives each
  live generating actor (``Hello.generates``; not the evaluator) an equal share of
  budget − outstanding, outstanding = started − dropped − taken as reported by heartbeats
  (``groups_started``/``groups_dropped``) and counted by seq; a changed share is pushed at
  once. Exact with one actor; with several, heartbeat lag can let them overshoot briefly
  (the learner's staleness backstop still applies).
- Accounting by (actor_id, incarnation, seq): a repeated seq is dropped and counted as a
  duplicate; a jump in seq counts the skipped seqs as lost (one that arrives later is
  delivered and counted as late); a new incarnation of an actor id replaces the old one,
  whose accounting is closed: seqs below the last ``groups_sent`` it reported (heartbeat
  or goodbye) that never arrived are counted lost (sends after its last heartbeat cannot
  be known). Valid groups that arrive are always delivered (an old incarnation's and
  uncredited ones too, the latter counted).
- Every received frame goes through ``schema`` decoding; malformed frames are dropped and
  counted by reason (``schema.REASONS`` plus ``bad_frames``, ``unexpected_kind``,
  ``internal_error``) and the receiver keeps serving. A rejected group whose envelope
  names a known incarnation still uses up its seq (counted rejected, not lost). Nothing
  is unpickled. Queued trajectory messages are decoded in batches (up to ``_BATCH``) so
  that the log-prob checks of all their groups are one vectorised pass.
- Liveness: an actor is alive while its last message is younger than ``peer_timeout_s``
  and it has not said goodbye or been replaced.
- Learner restarts: every learner instance has its own id (``Envelope.incarnation`` of its
  messages). A client that hears a new one forgets the old one's state (version, credits,
  eta, admission) and, until its owner calls ``rejoin()`` (a new incarnation: seq from 0),
  admits nothing, sends nothing (``LearnerRestarted``) and heartbeats nothing; messages
  from a replaced instance, and Credits/Acks addressed to another incarnation
  (``Credit.incarnation``), are ignored. A learner instance that first hears of an
  incarnation without its Hello (a heartbeat or group from an actor that talked to an
  earlier instance) counts it from there (``joined_midway``): earlier seqs are not its loss.
- Security: loopback endpoints (127.0.0.0/8, ::1, localhost, ipc, inproc) run without
  CURVE unless ``curve_force``; any other endpoint needs CURVE: the learner's secret key
  (``curve_secret_key``) and a folder of allowed actor public keys
  (``curve_public_keys_dir``, read at start), else ``TransportSecurityError`` before
  anything binds. Actors use ``curve_client_secret_key`` and the learner's public key.
  Peers without an allowed key complete no handshake, so nothing of theirs is ever read;
  failed handshakes are counted.
- Counters (``LearnerServer.counters()``, or ``metrics()`` under ``system/transport/``):
  received, duplicates, gaps, lost, late, uncredited, rejected and rejected/<reason>,
  credits_granted, alive_actors, incarnations, goodbyes, timeouts, auth failures.

Threads: ``LearnerServer.recv_group`` and ``ActorClient.send_group``/``close`` run in the
caller's thread, which owns the trajectory socket (one caller thread each); a background
thread per object owns the control socket and shares state with the caller under a lock,
waking it through an inproc pipe.

Not covered: moving weights (a ``PolicyUpdate`` only names a backend and a handle), the
learner's staleness filtering of finished groups, what an actor does with groups it
generated for a replaced learner (``actors.actor`` drops them), binding an actor id to a
CURVE key (any allowed key may claim any actor id), ordering across actors.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import socket as _socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from common.config import TransportConfig
from common.schema import (
    SCHEMA_VERSION,
    Ack,
    ActorMetrics,
    decode_batch,
    peek_identity,
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

__all__ = [
    "TransportError",
    "TransportSecurityError",
    "ShutdownRequested",
    "LearnerRestarted",
    "LearnerServer",
    "ActorClient",
    "is_loopback",
    "curve_enabled",
]

log = logging.getLogger(__name__)

LEARNER_ID = "learner"


class TransportError(RuntimeError):
    """The transport cannot do what was asked (closed, misconfigured)."""


class TransportSecurityError(TransportError, ValueError):
    """An endpoint would be exposed without CURVE, or the CURVE key files are unusable."""


class LearnerRestarted(TransportError):
    """The learner this client talked to was replaced by a new instance: call ``rejoin()``."""


class ShutdownRequested(TransportError):
    """The learner asked this actor to shut down; ``reason`` is the learner's."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"learner requested shutdown: {reason}")


# --------------------------------------------------------------------------- security


def is_loopback(endpoint: str) -> bool:
    """True if ``endpoint`` cannot be reached from another machine."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or not rest:
        return False
    host = rest.rsplit(";", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name, a host name
        return False


def curve_enabled(cfg: TransportConfig) -> bool:
    """Both sides use CURVE iff forced or any endpoint is not loopback."""
    return cfg.curve_force or not (is_loopback(cfg.trajectory_addr) and is_loopback(cfg.control_addr))


def _load_keypair(path: str | None, what: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    if not path:
        raise TransportSecurityError(f"{what} is not set")
    p = Path(path)
    if not p.is_file():
        raise TransportSecurityError(f"{what}: no such file {p}")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (ValueError, OSError) as e:
        raise TransportSecurityError(f"{what}: cannot read a CURVE key from {p}: {e}") from None
    if need_secret and not secret:
        raise TransportSecurityError(f"{what}: {p} holds no secret key")
    return public, secret


def _server_curve_setup(cfg: TransportConfig) -> tuple[bytes, bytes, Path]:
    exposed = [a for a in (cfg.trajectory_addr, cfg.control_addr) if not is_loopback(a)]
    why = (f"endpoint(s) {', '.join(exposed)} are not loopback" if exposed else "transport.curve_force is on")
    if not cfg.curve_secret_key or not cfg.curve_public_keys_dir:
        raise TransportSecurityError(
            f"refusing to bind without CURVE: {why}; set transport.curve_secret_key (the learner's "
            "secret-key file) and transport.curve_public_keys_dir (allowed actors' public keys), "
            "e.g. written by zmq.auth.create_certificates, or bind 127.0.0.1")
    public, secret = _load_keypair(cfg.curve_secret_key, "transport.curve_secret_key", True)
    keys_dir = Path(cfg.curve_public_keys_dir)
    if not keys_dir.is_dir():
        raise TransportSecurityError(f"transport.curve_public_keys_dir: no such folder {keys_dir}")
    if not any(keys_dir.glob("*.key")):
        log.warning("transport: %s holds no public keys; no actor can connect", keys_dir)
    return public, secret, keys_dir


def _client_curve_setup(cfg: TransportConfig) -> tuple[bytes, bytes, bytes]:
    public, secret = _load_keypair(cfg.curve_client_secret_key, "transport.curve_client_secret_key", True)
    server_file = cfg.curve_server_public_key or cfg.curve_secret_key
    server_public, _ = _load_keypair(server_file, "transport.curve_server_public_key", False)
    return public, secret, server_public


# ------------------------------------------------------------------------------ helpers


class _Wakeup:
    """A queue of Python commands plus an inproc PAIR that wakes the owning thread's poll."""

    def __init__(self, ctx: zmq.Context):
        addr = f"inproc://wake-{uuid.uuid4().hex}"
        self.rx = ctx.socket(zmq.PAIR)
        self.rx.bind(addr)
        self.tx = ctx.socket(zmq.PAIR)
        self.tx.connect(addr)
        self.queue: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def put(self, item) -> None:
        self.queue.append(item)
        with self._lock:
            if not self.tx.closed:
                try:
                    self.tx.send(b"", zmq.NOBLOCK)
                except zmq.Again:  # wake-ups already pending
                    pass

    def drain(self) -> list:
        while True:
            try:
                self.rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        items = []
        while self.queue:
            items.append(self.queue.popleft())
        return items

    def close(self) -> None:
        with self._lock:
            self.tx.close(linger=0)
        self.rx.close(linger=0)


def _drain(sock: zmq.Socket, max_n: int = 1000):
    for _ in range(max_n):
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


# ------------------------------------------------------------------------------ learner


@dataclass(eq=False)
class _Incarnation:
    actor_id: str
    incarnation: str
    next_seq: int = 0             # highest trajectory seq seen + 1 (or closure point)
    missing: set = field(default_factory=set)  # seqs skipped and not (yet) arrived
    untracked_lost: int = 0       # skipped seqs beyond the tracking bound
    received: int = 0
    granted_total: int = 0
    consumed_next: int = 0        # highest seq the learner has taken + 1
    reported_sent: int = 0        # groups_sent from the latest heartbeat / goodbye
    closed: bool = False
    closed_why: str = ""
    leaving: bool = False         # said goodbye on the control channel
    said_goodbye: bool = False
    identity: bytes | None = None  # control-socket routing id
    last_seen: float = 0.0
    alive: bool = False
    policy_version: int = 0
    in_flight: int = 0
    metrics: dict = field(default_factory=dict)
    generates: bool = True        # from its Hello: starts groups (the evaluator does not)
    started: int = 0              # groups started, from its latest heartbeat (cumulative)
    dropped: int = 0              # of those never to be sent, from its latest heartbeat
    admit_sent: int | None = None  # the admit_total last sent to it
    taken_at_budget: int = 0      # consumed_next when the learner last set the budget
    announced: bool = False       # this learner instance had its Hello
    count_from: int = 0           # seqs below it are not this instance's to count lost


_BATCH = 32                 # queued trajectory messages processed together
_NOBLOCK = int(zmq.NOBLOCK)
_MAX_TRACKED_GAP = 1 << 16  # larger seq jumps are counted but their seqs not remembered
_MAX_OLD_INCARNATIONS = 8   # closed incarnations remembered per actor id


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
        self._current: dict[str, _Incarnation] = {}
        self._incs: dict[tuple[str, str], _Incarnation] = {}
        self._old: dict[str, collections.deque] = {}
        self._c = collections.Counter()
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
                            rec = incs.get(key) or self._record(*key, promote=False)
                            last = (key, rec)
                        seq = env.seq
                        if not rec.announced and rec.received == 0 and seq > rec.next_seq:
                            self._joined_midway(rec, seq, group=True)
                        if seq == rec.next_seq:  # the common case, inline
                            rec.next_seq = seq + 1
                        elif not self._account(rec, seq):
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
                    if rec is not None and who[2] >= 0 and self._account(rec, who[2], count_duplicate=False):
                        refund.append((who[2], rec, ident))
                    continue
                else:  # Goodbye: after all of this incarnation's groups (same connection)
                    rec = self._record(env.actor_id, env.incarnation, promote=False)
                    if self._account(rec, env.seq):
                        if not rec.said_goodbye:
                            rec.said_goodbye = True
                            c["goodbyes"] += 1
                        rec.reported_sent = max(rec.reported_sent, body.groups_sent, env.seq)
                        self._close_incarnation(rec, "goodbye")
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

    def _consumed(self, seq: int, rec: _Incarnation, ident) -> None:
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

    def _record(self, actor_id: str, incarnation: str, promote: bool) -> _Incarnation:
        """The record of an incarnation, created if new. A new one becomes the actor's
        current incarnation if ``promote`` (it announced itself) or if the actor has no live
        one; otherwise (groups from an unannounced incarnation) it is only remembered.
        Caller holds the lock."""
        rec = self._incs.get((actor_id, incarnation))
        if rec is None:
            rec = _Incarnation(actor_id, incarnation, last_seen=time.monotonic())
            self._incs[(actor_id, incarnation)] = rec
            cur = self._current.get(actor_id)
            if promote or cur is None or cur.closed:
                self._make_current(rec)
            else:
                self._remember_old(rec)
        elif promote and not rec.closed:
            self._make_current(rec)
        return rec

    def _make_current(self, rec: _Incarnation) -> None:
        cur = self._current.get(rec.actor_id)
        if cur is rec:
            return
        self._current[rec.actor_id] = rec
        self._c["incarnations"] += 1
        dq = self._old.get(rec.actor_id)
        if dq is not None and rec in dq:
            dq.remove(rec)
        if cur is not None:
            self._close_incarnation(cur, "replaced")
            self._remember_old(cur)

    def _remember_old(self, rec: _Incarnation) -> None:
        # bounded memory of non-current incarnations (late groups, duplicates, tail loss)
        dq = self._old.setdefault(rec.actor_id, collections.deque())
        if rec not in dq:
            dq.append(rec)
        while len(dq) > _MAX_OLD_INCARNATIONS:
            gone = dq.popleft()
            if self._current.get(gone.actor_id) is not gone:
                self._incs.pop((gone.actor_id, gone.incarnation), None)

    def _account(self, rec: _Incarnation, seq: int, count_duplicate: bool = True) -> bool:
        """Sequence accounting; False = duplicate (drop). Caller holds the lock."""
        c = self._c
        nxt = rec.next_seq
        if seq == nxt:
            rec.next_seq = nxt + 1
            return True
        if seq < nxt:
            if seq in rec.missing:
                rec.missing.discard(seq)
                c["lost"] -= 1
                c["late"] += 1
                return True
            if count_duplicate:
                c["duplicates"] += 1
            return False
        self._mark_lost(rec, nxt, seq)
        rec.next_seq = seq + 1
        return True

    def _joined_midway(self, rec: _Incarnation, seq: int, group: bool) -> None:
        """``rec`` was first heard of at ``seq`` (its first group's seq, or the groups_sent of
        its first heartbeat) without a Hello: an actor that was talking to an earlier learner
        instance (this one restarted), or whose Hello was lost. Its seqs below ``seq`` are not
        counted lost by this instance (they may have gone to the earlier one); a first group
        moves the sequence there. Caller holds the lock."""
        if rec.count_from == 0:
            self._c["joined_midway"] += 1
        rec.count_from = max(rec.count_from, seq)
        if group:
            rec.next_seq = max(rec.next_seq, seq)

    def _mark_lost(self, rec: _Incarnation, start: int, stop: int) -> None:
        n = stop - start
        if n <= 0:
            return
        self._c["gaps"] += 1
        self._c["lost"] += n
        if n <= _MAX_TRACKED_GAP and len(rec.missing) < _MAX_TRACKED_GAP:
            rec.missing.update(range(start, stop))
        else:
            rec.untracked_lost += n
        if self._c["gaps"] <= 20 or self._c["gaps"] % 1000 == 0:  # bounded log volume
            log.warning("transport: %s/%s lost trajectory seqs [%d, %d) (gap #%d)", rec.actor_id,
                        rec.incarnation[:8], start, stop, self._c["gaps"])

    def _close_incarnation(self, rec: _Incarnation, why: str) -> None:
        # caller holds the lock; seqs it reported sent that never came are lost
        if rec.closed:
            return
        rec.closed, rec.closed_why, rec.alive = True, why, False
        self._c["closed_incarnations"] += 1
        start = max(rec.next_seq, rec.count_from)
        if rec.reported_sent > start:
            self._mark_lost(rec, start, rec.reported_sent)
            rec.next_seq = rec.reported_sent

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
        """Capacity-based admission (AReaL's rule): ``budget`` = (η + v + 1)·B (η − k with
        controlled staleness ``actor_lag`` = k, computed by ``Ingest``) − groups the
        learner has already accepted (consumed or buffered), i.e. how many more groups may
        be outstanding (started by actors, not yet taken by ``recv_group``). The server
        shares ``budget − outstanding`` among the live generating actors and sends each its
        ``Credit.admit_total``; None lifts the bound (the version rule alone). Cheap: call it
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

    def _send(self, rec: _Incarnation, bodies) -> None:
        if rec.identity is None:
            return
        for body in bodies:
            env = Envelope(SCHEMA_VERSION, LEARNER_ID, self.instance, self._out_seq, time.time(), body, self.run_id)
            self._out_seq += 1
            try:
                self._ctrl.send_multipart([rec.identity, encode(env, validate=False)], zmq.NOBLOCK)
            except zmq.Again:  # peer's queue full: state is re-sent with the next heartbeat
                pass

    def _state(self, rec: _Incarnation) -> list:
        """Messages telling ``rec`` the current state; grants credit up to the window.
        Caller holds the lock."""
        if self._shutdown_reason is not None:
            return [Shutdown(reason=self._shutdown_reason)]
        out = []
        if self._latest_update is not None:
            out.append(self._latest_update)
        out.append(self._grant(rec))
        return out

    def _grant(self, rec: _Incarnation) -> Credit:
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

    def _generating(self) -> list[_Incarnation]:
        """Live incarnations that start groups, in actor-id order. Caller holds the lock."""
        return sorted((r for r in self._current.values() if r.generates and not (r.closed or r.leaving)),
                      key=lambda r: r.actor_id)

    def _admit_total(self, rec: _Incarnation) -> int | None:
        """The cumulative number of groups ``rec`` may have started: what it has started
        (last heartbeat) plus its share of the room, room = budget − Σ outstanding over the
        generating actors, outstanding = started − dropped − taken (seqs consumed, as of the
        budget's snapshot). Shares are equal, the remainder to the first actors by id. With
        one actor this equals budget + dropped + taken, exact whatever the heartbeat lag.
        Caller holds the lock."""
        if self._admission_budget is None or not rec.generates:
            return None
        gens = self._generating()
        if rec not in gens:
            return rec.started
        # not clamped per actor: a lagging heartbeat (taken > started reported) cancels out
        outstanding = sum(r.started - r.dropped - r.taken_at_budget for r in gens)
        room = max(self._admission_budget - outstanding, 0)
        i = gens.index(rec)
        return rec.started + room // len(gens) + (1 if i < room % len(gens) else 0)

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
                rec = self._record(*key, promote=True)
                rec.generates = body.generates
                rec.announced = True
            elif kind is Heartbeat:
                self._c["heartbeats"] += 1
                if rec is None:  # its Hello was lost, or it talked to an earlier learner instance:
                    rec = self._record(*key, promote=True)  # a heartbeat announces it as well
                    if body.groups_sent > 0:
                        self._joined_midway(rec, body.groups_sent, group=False)
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
                        self._mark_lost(rec, start, rec.reported_sent)
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


# -------------------------------------------------------------------------------- actor


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
        if (self._shutdown_reason is not None or self._learner_version is None or self._eta is None
                or self._rejoin_needed):
            return False
        return self._learner_version - my_version <= self._eta

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
