"""The learner's books on every actor incarnation: sequence accounting by (actor_id,
incarnation, seq) and which incarnation is an actor's current one.

Who calls it: ``LearnerServer`` (``common.transport.server``), under its lock, from both its
threads. Invariants (the transport's contract says them in full): a repeated seq is a
duplicate; a jump counts the skipped seqs lost, and one of them arriving later turns lost
into late; a new incarnation of an actor id closes the old one, whose reported but never
received seqs are lost; an incarnation first heard of mid-stream (``joined_midway``) is not
charged for the seqs before it. Memory is bounded (``MAX_TRACKED_GAP`` seqs remembered per
gap, ``MAX_OLD_INCARNATIONS`` closed incarnations per actor id).
Not covered: credits, admission, liveness timeouts (the server's), any socket.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_TRACKED_GAP = 1 << 16  # larger seq jumps are counted but their seqs not remembered
MAX_OLD_INCARNATIONS = 8   # closed incarnations remembered per actor id


@dataclass(eq=False)
class Incarnation:
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


class Ledger:
    """Every incarnation the server has heard of: ``current`` (actor id -> its current
    incarnation), ``incs`` ((actor id, incarnation) -> record, current and recent old ones)
    and the counters it keeps in the server's ``counters`` (gaps, lost, late, duplicates,
    incarnations, closed_incarnations, joined_midway). Not thread-safe: the caller holds
    its lock around every call."""

    def __init__(self, counters: collections.Counter):
        self.c = counters
        self.current: dict[str, Incarnation] = {}
        self.incs: dict[tuple[str, str], Incarnation] = {}
        self.old: dict[str, collections.deque] = {}

    def record(self, actor_id: str, incarnation: str, promote: bool) -> Incarnation:
        """The record of an incarnation, created if new. A new one becomes the actor's
        current incarnation if ``promote`` (it announced itself) or if the actor has no live
        one; otherwise (groups from an unannounced incarnation) it is only remembered.
        Caller holds the server's lock."""
        rec = self.incs.get((actor_id, incarnation))
        if rec is None:
            rec = Incarnation(actor_id, incarnation, last_seen=time.monotonic())
            self.incs[(actor_id, incarnation)] = rec
            cur = self.current.get(actor_id)
            if promote or cur is None or cur.closed:
                self.make_current(rec)
            else:
                self.remember_old(rec)
        elif promote and not rec.closed:
            self.make_current(rec)
        return rec

    def make_current(self, rec: Incarnation) -> None:
        cur = self.current.get(rec.actor_id)
        if cur is rec:
            return
        self.current[rec.actor_id] = rec
        self.c["incarnations"] += 1
        dq = self.old.get(rec.actor_id)
        if dq is not None and rec in dq:
            dq.remove(rec)
        if cur is not None:
            self.close_incarnation(cur, "replaced")
            self.remember_old(cur)

    def remember_old(self, rec: Incarnation) -> None:
        # bounded memory of non-current incarnations (late groups, duplicates, tail loss)
        dq = self.old.setdefault(rec.actor_id, collections.deque())
        if rec not in dq:
            dq.append(rec)
        while len(dq) > MAX_OLD_INCARNATIONS:
            gone = dq.popleft()
            if self.current.get(gone.actor_id) is not gone:
                self.incs.pop((gone.actor_id, gone.incarnation), None)

    def account(self, rec: Incarnation, seq: int, count_duplicate: bool = True) -> bool:
        """Sequence accounting; False = duplicate (drop). Caller holds the server's lock."""
        c = self.c
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
        self.mark_lost(rec, nxt, seq)
        rec.next_seq = seq + 1
        return True

    def joined_midway(self, rec: Incarnation, seq: int, group: bool) -> None:
        """``rec`` was first heard of at ``seq`` (its first group's seq, or the groups_sent of
        its first heartbeat) without a Hello: an actor that was talking to an earlier learner
        instance (this one restarted), or whose Hello was lost. Its seqs below ``seq`` are not
        counted lost by this instance (they may have gone to the earlier one); a first group
        moves the sequence there. Caller holds the server's lock."""
        if rec.count_from == 0:
            self.c["joined_midway"] += 1
        rec.count_from = max(rec.count_from, seq)
        if group:
            rec.next_seq = max(rec.next_seq, seq)

    def mark_lost(self, rec: Incarnation, start: int, stop: int) -> None:
        n = stop - start
        if n <= 0:
            return
        self.c["gaps"] += 1
        self.c["lost"] += n
        if n <= MAX_TRACKED_GAP and len(rec.missing) < MAX_TRACKED_GAP:
            rec.missing.update(range(start, stop))
        else:
            rec.untracked_lost += n
        if self.c["gaps"] <= 20 or self.c["gaps"] % 1000 == 0:  # bounded log volume
            log.warning("transport: %s/%s lost trajectory seqs [%d, %d) (gap #%d)", rec.actor_id,
                        rec.incarnation[:8], start, stop, self.c["gaps"])

    def close_incarnation(self, rec: Incarnation, why: str) -> None:
        # caller holds the server's lock; seqs it reported sent that never came are lost
        if rec.closed:
            return
        rec.closed, rec.closed_why, rec.alive = True, why, False
        self.c["closed_incarnations"] += 1
        start = max(rec.next_seq, rec.count_from)
        if rec.reported_sent > start:
            self.mark_lost(rec, start, rec.reported_sent)
            rec.next_seq = rec.reported_sent
