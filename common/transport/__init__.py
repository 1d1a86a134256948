"""ZeroMQ transport between actors and the learner: trajectories one way, control the other.

Modules: ``server`` (``LearnerServer``, the learner's end), ``client`` (``ActorClient``, an
actor's end), ``ledger`` (the learner's sequence accounting per actor incarnation),
``security`` (CURVE: when it is required, the key files), ``base`` (errors, shared helpers).
Import from here: ``from common.transport import ActorClient, LearnerServer``.

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
- Admission: the rule is ``common.admission`` (its rules 1 and 5). The client admits a group
  by the version rule, using the newest version it has heard of (not before it has heard
  from the learner, nor after shutdown); with a capacity budget (``set_admission``, computed
  by the learner's ``Ingest``) it also starts groups only while its count stays below
  ``Credit.admit_total``, the server's share of the budget for it, pushed at once when it
  changes.
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

from common.transport.base import LEARNER_ID, LearnerRestarted, ShutdownRequested, TransportError, TransportSecurityError
from common.transport.client import ActorClient
from common.transport.security import curve_enabled, is_loopback
from common.transport.server import LearnerServer

__all__ = [
    "LEARNER_ID",
    "TransportError",
    "TransportSecurityError",
    "ShutdownRequested",
    "LearnerRestarted",
    "LearnerServer",
    "ActorClient",
    "is_loopback",
    "curve_enabled",
]
