"""The staleness and admission rule, in one place: which groups an actor may start, how many
may be outstanding, and what the learner does with a group it receives. Pure: no I/O, no
sockets, no clocks. Called by the learner's intake (``learner/ingest.py``: budget, fate), the
transport's server (``common/transport/server.py``: each actor's share) and client (version
rule, room left), and through the client by the actor loop (``actors/actor.py``), which waits
while it is not admitted. To change the rule, change it here; the docstrings elsewhere point
here.

The rule (η = ``async.max_staleness``, k = ``async.actor_lag``, B = ``batch.prompts_per_step``):

1. Version rule (``version_admitted``). An actor may start a group with weights of version w
   while the newest learner version v it has heard of has v − w ≤ η. Before it has heard
   from the learner (and after a shutdown) it is not admitted.
2. Staleness backstop (``is_stale``). The learner trains a group at version v only if its
   oldest token's version o has v − o ≤ η; otherwise the group is dropped, counted ``stale``.
3. Capacity rule (``async.admission: capacity``, AReaL's; ``capacity_room``). At version v
   the learner will have consumed v·B groups. A group started now is already k versions old
   (controlled staleness: actors generate with weights k versions behind the announced one),
   so it may be used up to version v + η − k; so at most (η − k + 1)·B groups may be accepted
   (buffered, or taken for the batch being built) or outstanding at once:
   room = (η − k + 1)·B − accepted. Before k was in the room, at η = 8 and k = 7 actors ran
   9 batches ahead and about half of all groups aged past η (measured, docs/results.md §5).
   Accepted counts only groups a batch will train on (``usable_buffered``): the batch being
   built takes B − taken more, each later version B, oldest first, and a buffered group whose
   turn comes after it has aged past η (rule 2) holds no room. Counting such doomed groups
   (at η = 1, the surplus of a version left over after its batch) made the actor start too
   few fresh ones, so every other step waited a whole generation batch for data
   (benchmarks/pipeline.py, 2026-12-08).
4. The filter's share (``keep_rate``, ``AdmissionRule.budget``). The accuracy filter drops
   part of what is generated, so the budget handed to the actors is
   ⌈(room + z·√(room·(1 − p))) / p⌉: p is the recent keep rate (kept over kept + filtered +
   truncated, over the last ``KEEP_WINDOW`` groups, floored at ``MIN_KEEP_RATE``, 1 until
   ``KEEP_WARMUP`` groups are seen) and z = ``async.admission_slack`` standard deviations of
   the binomial keep count, so that a batch is rarely a few groups short.
5. Shares (``admit_total``). The server divides budget − outstanding equally among the live
   generating actors (the evaluator generates nothing), the remainder to the first by actor
   id; outstanding = started − dropped − taken, from heartbeats and seqs. Exact with one
   actor; with several, heartbeat lag can let them overshoot briefly (rule 2 still applies).
6. Fate of a received group (``group_fate``), checked in this order: ``stale`` (rule 2),
   ``truncated`` (a response hit max_tokens and ``prime.drop_truncated``), ``filtered`` (mean
   outcome outside [filter_low, filter_high], PRIME §6), else ``kept``. Filtered, truncated
   and stale groups use no room.

Not covered: credits (back-pressure on sending, the transport's), the schema and sanity
checks a group passes first (``learner.ingest.check_group``), the lockstep replay of rule 6
on the actor side (``common.lockstep``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["KEEP_WARMUP", "KEEP_WINDOW", "MIN_KEEP_RATE", "AdmissionRule", "admit_total", "capacity_room",
           "group_fate", "is_stale", "keep_rate", "usable_buffered", "version_admitted"]

KEEP_WINDOW = 256    # groups in the keep-rate estimate [groups]
KEEP_WARMUP = 16     # groups seen before the estimate is used [groups]
MIN_KEEP_RATE = 0.1  # floor of the estimate (bounds the inflation to 10x) [fraction]
_TOL = 1e-9          # the filter's bounds are inclusive up to rounding


def version_admitted(learner_version: int | None, own_version: int, eta: int | None) -> bool:
    """Rule 1: may a group be started with weights ``own_version`` while the learner is at
    ``learner_version``? False while either is unknown (None)."""
    if learner_version is None or eta is None:
        return False
    return learner_version - own_version <= eta


def is_stale(oldest_version: int, current_version: int, eta: int) -> bool:
    """Rule 2: a group whose oldest token is more than η versions behind ``current_version``."""
    return current_version - oldest_version > eta


def capacity_room(eta: int, actor_lag: int, groups_per_step: int, accepted: int) -> int:
    """Rule 3: groups that may still be started, (η − k + 1)·B − ``accepted``, at least 0."""
    return max((eta - actor_lag + 1) * groups_per_step - accepted, 0)


def usable_buffered(oldest_versions: Sequence[int], current_version: int, taken: int, eta: int,
                    groups_per_step: int) -> int:
    """Rule 3's accepted count for buffered groups: how many of them the coming batches train on.

    Args: oldest_versions: [N] the buffered groups' oldest token versions, in buffer (FIFO)
    order; current_version: the version the batch being built trains from; taken: groups it
    already holds (``groups_per_step`` or more: it is complete, the next batch is at
    ``current_version`` + 1); eta: η; groups_per_step: B.
    Replays ``Ingest.next_batch``: batches take groups oldest first, B per version, and a group
    that is stale (rule 2) at the version whose batch reaches it is dropped there, using no
    room. Returns the number used (≤ N)."""
    version, left, used = current_version, groups_per_step - taken, 0
    if left <= 0:  # the batch being built is complete: the next one trains from the next version
        version, left = current_version + 1, groups_per_step
    for oldest in oldest_versions:
        if left == 0:  # this batch is full: the rest go to the next version's
            version, left = version + 1, groups_per_step
        if is_stale(oldest, version, eta):
            continue
        left -= 1
        used += 1
    return used


def keep_rate(recent: Sequence[int]) -> float:
    """Rule 4's p: the share of 1s in ``recent`` (1 kept, 0 filtered or truncated; the caller
    keeps the last ``KEEP_WINDOW``), floored at ``MIN_KEEP_RATE``; 1.0 until ``KEEP_WARMUP``."""
    if len(recent) < KEEP_WARMUP:
        return 1.0
    return max(sum(recent) / len(recent), MIN_KEEP_RATE)


def admit_total(budget: int, started: Sequence[int], dropped: Sequence[int], taken: Sequence[int],
                index: int) -> int:
    """Rule 5: the cumulative number of groups actor ``index`` of the live generating actors
    (in actor-id order; per actor: groups ``started`` and ``dropped`` as last reported,
    ``taken`` by the learner) may have started: its started plus its share of
    room = budget − Σ (started − dropped − taken). With one actor this is
    budget + dropped + taken whatever the heartbeat lag (not clamped per actor: a lagging
    heartbeat, taken > started, cancels out)."""
    n = len(started)
    outstanding = sum(s - d - t for s, d, t in zip(started, dropped, taken))
    room = max(budget - outstanding, 0)
    return started[index] + room // n + (1 if index < room % n else 0)


def group_fate(outcomes: Sequence[float], any_truncated: bool, oldest_version: int, current_version: int, *,
               eta: int, low: float, high: float, drop_truncated: bool) -> str:
    """Rule 6: what the learner does with a group at ``current_version``.

    Args: outcomes: [K] verifier rewards of the group's responses; any_truncated: a response
    ended by max_tokens; oldest_version: the oldest token's policy version.
    Returns one of ``"stale"``, ``"truncated"``, ``"filtered"``, ``"kept"`` (checked in that order).
    """
    if is_stale(oldest_version, current_version, eta):
        return "stale"
    if drop_truncated and any_truncated:
        return "truncated"
    acc = sum(float(o) for o in outcomes) / max(len(outcomes), 1)
    if not (low - _TOL <= acc <= high + _TOL):
        return "filtered"
    return "kept"


@dataclass(frozen=True)
class AdmissionRule:
    """One run's rule: η, k, B (None: no capacity bound, the version rule alone) and z."""

    eta: int                             # async.max_staleness [versions]
    actor_lag: int = 0                   # async.actor_lag, k [versions]
    groups_per_step: int | None = None   # B when async.admission = capacity, else None [groups]
    slack: float = 0.0                   # async.admission_slack, z [standard deviations]

    def __post_init__(self):
        if self.eta < 0:
            raise ValueError(f"max_staleness must be >= 0 (got {self.eta})")
        if not 0 <= self.actor_lag <= max(self.eta - 1, 0):
            raise ValueError(f"actor_lag ({self.actor_lag}) must be in [0, max_staleness - 1] "
                             f"(max_staleness {self.eta})")
        if self.groups_per_step is not None and self.groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1 (got {self.groups_per_step})")

    @classmethod
    def from_config(cls, async_cfg, prompts_per_step: int) -> "AdmissionRule":
        """From the config's ``async`` section and ``batch.prompts_per_step``."""
        return cls(eta=int(async_cfg.max_staleness), actor_lag=int(async_cfg.actor_lag),
                   groups_per_step=int(prompts_per_step) if async_cfg.admission == "capacity" else None,
                   slack=float(async_cfg.admission_slack))

    @property
    def capacity(self) -> bool:
        return self.groups_per_step is not None

    def initial_budget(self) -> int | None:
        """The budget before the learner has counted anything: 0 with a capacity bound (nobody
        starts a group before the learner sets it), None without."""
        return 0 if self.capacity else None

    def budget(self, accepted: int, p: float) -> int | None:
        """Rules 3 and 4: ⌈(room + z·√(room·(1 − p))) / p⌉ for ``accepted`` groups and keep
        rate ``p``; None without a capacity bound."""
        if not self.capacity:
            return None
        room = capacity_room(self.eta, self.actor_lag, self.groups_per_step, accepted)
        extra = self.slack * math.sqrt(room * (1.0 - p)) if room else 0.0
        return int(math.ceil((room + extra) / p - 1e-9))
