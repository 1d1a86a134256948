"""Rank 0's intake: trajectory groups from the transport into step-sized batches.

Contract
--------
- Source: anything with ``recv_group(timeout) -> Envelope | None`` (``LearnerServer``).
- Every received group is first checked against what the schema cannot see
  (``check_group`` with the run's ``GroupLimits``: group size, empty responses, token ids
  outside the vocabulary, lengths over the maxima, versions negative, decreasing or newer
  than the learner's, log-probs no sampler produces); a failing group is rejected, logged
  and counted by reason (``system/ingest/rejected/<reason>``), never trained on, and never
  reaches the code below (which would crash on some of them).
- Every other received group is either kept or counted under exactly one reason:
  ``stale`` (a token older than current_version − η: the backstop behind admission),
  ``truncated`` (a response hit max_tokens and ``prime.drop_truncated``), ``filtered``
  (mean outcome outside [filter_low, filter_high], PRIME §6), ``overflow`` (the surplus
  buffer was full; the oldest waiting group goes); the rule is ``common.lockstep.group_fate``.
  Kept groups wait in a FIFO buffer; a batch takes the oldest first. Staleness is re-checked
  when a group leaves the buffer.
- ``next_batch(n, current_version)`` returns n groups, blocking until they exist, and the
  seconds it waited (the learner's wait-for-data time).
- Admission (``groups_per_step`` = B given): the capacity rule of AReaL. At learner version v
  the learner will have consumed v·B groups; groups started from now on may be used up to
  version v + η, so at most (η + v + 1)·B groups may ever be accepted or outstanding. The
  budget handed to the server (``server.set_admission``) is that bound minus the groups
  accepted so far: (η + 1)·B − buffered − already taken for the batch being built. Under
  controlled staleness (``actor_lag`` = k: actors generate with weights k versions behind
  the announced one) a group started now is already k versions old, so it may be used only
  up to version v + η − k, and the bound is (η − k + 1)·B (without this, at η = 8 and
  k = 7 actors ran 9 batches ahead and half of all groups aged past η, measured). It is
  renewed whenever a group is accepted or taken and when the version advances; filtered,
  truncated and stale groups use no room (they free it when they arrive). Because the
  accuracy filter will discard a share of what is generated, the room is divided by the
  recent keep rate p (kept / (kept + filtered + truncated) over the last ``KEEP_WINDOW``
  groups, floored at ``MIN_KEEP_RATE``; 1 until ``KEEP_WARMUP`` groups are seen), so that the
  outstanding groups are expected to fill it — without this a synchronous run (η = 0)
  would refill its last few slots one small generation at a time. With admission the
  ``stale`` backstop catches the variance of the filter and groups from actors that
  started before hearing of a new version.
Not covered: credits and transport accounting (the server's), sharding to ranks.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import numpy as np

from common.lockstep import group_fate, is_stale

log = logging.getLogger(__name__)


KEEP_WINDOW = 256    # groups in the keep-rate estimate [groups]
KEEP_WARMUP = 16     # groups seen before the estimate is used [groups]
MIN_KEEP_RATE = 0.1  # floor of the estimate (bounds the inflation to 10x) [fraction]
MIN_LOGP = -50.0     # a sampled token below this log-prob (p < 2e-22) means a broken or hostile sender [nats]


@dataclass(frozen=True)
class GroupLimits:
    """What a well-formed group of this run looks like beyond its schema (None: unchecked)."""

    k: int | None = None                  # responses per group (generation.k)
    vocab_size: int | None = None         # token ids must be in [0, vocab_size)
    max_prompt_tokens: int | None = None  # generation.max_prompt_tokens
    max_tokens: int | None = None         # generation.max_tokens (response length)


def check_group(group, current_version: int, limits: GroupLimits) -> str | None:
    """Why the learner must not train on ``group`` at ``current_version``, or None.

    The schema has already checked types, array sizes, equal per-response lengths, a non-empty
    prompt and finite, non-positive log-probs; this checks what it cannot know: the group
    size, empty responses, token ids outside the vocabulary, lengths over the configured
    maxima, per-token versions that are negative, decreasing or newer than the learner's,
    and log-probs no sampler produces (below ``MIN_LOGP``). Returns the reason (a metric name)."""
    if limits.k is not None and len(group.responses) != limits.k:
        return "group_size"
    prompt = group.prompt_tokens.to_numpy()
    if limits.max_prompt_tokens is not None and prompt.shape[0] > limits.max_prompt_tokens:
        return "prompt_too_long"
    if _bad_ids(prompt, limits.vocab_size):
        return "token_id"
    for r in group.responses:
        ids = r.token_ids.to_numpy()
        if ids.shape[0] == 0:
            return "empty_response"
        if limits.max_tokens is not None and ids.shape[0] > limits.max_tokens:
            return "response_too_long"
        if _bad_ids(ids, limits.vocab_size):
            return "token_id"
        v = r.policy_version.to_numpy()
        if v.min() < 0 or (v.shape[0] > 1 and (np.diff(v) < 0).any()):
            return "version_order"
        if v.max() > current_version:
            return "future_version"
        if r.behav_logp.to_numpy().min() < MIN_LOGP:
            return "implausible_logp"
    return None


def _bad_ids(ids: np.ndarray, vocab_size: int | None) -> bool:
    return ids.shape[0] > 0 and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size))


class Ingest:
    def __init__(self, server, max_staleness: int, filter_low: float, filter_high: float,
                 drop_truncated: bool = False, max_buffered: int = 1024, groups_per_step: int | None = None,
                 limits: GroupLimits | None = None, admission_slack: float = 0.0, actor_lag: int = 0):
        if not 0 <= actor_lag <= max(max_staleness - 1, 0):
            raise ValueError(f"actor_lag ({actor_lag}) must be in [0, max_staleness - 1] (max_staleness {max_staleness})")
        self.server = server
        self.actor_lag = int(actor_lag)  # k: versions a group is old when it starts (controlled staleness)
        self.admission_slack = float(admission_slack)  # z: standard deviations of the kept count
        self.limits = limits or GroupLimits()
        self.rejected = collections.Counter()  # reason -> groups (check_group)
        self.eta = max_staleness
        self.low, self.high = filter_low, filter_high
        self.drop_truncated = drop_truncated
        self.buffer: collections.deque = collections.deque()
        self.max_buffered = max_buffered
        self.counts = collections.Counter()
        self.groups_per_step = groups_per_step  # B; None = no capacity admission
        self._kept_recent: collections.deque = collections.deque(maxlen=KEEP_WINDOW)  # 1 kept, 0 filtered

    def keep_rate(self) -> float:
        """Recent share of groups the filters keep (staleness aside); 1.0 until KEEP_WARMUP."""
        if len(self._kept_recent) < KEEP_WARMUP:
            return 1.0
        return max(sum(self._kept_recent) / len(self._kept_recent), MIN_KEEP_RATE)

    def admission_budget(self, taken: int = 0) -> int | None:
        """⌈(room + z·√(room·(1 − p))) / p⌉ with room = (η − k + 1)·B − buffered − ``taken``
        (k = ``actor_lag``, 0 unless staleness is controlled)
        (``taken``: groups already taken for the batch being built), p the keep rate and z
        the admission slack: with z = 0 the groups that keep ``room`` on average; z > 0 adds
        z standard deviations of the filter's binomial keep count, so that a batch is rarely
        a few groups short (which makes the learner wait for one more generation round).
        None without admission."""
        if self.groups_per_step is None:
            return None
        room = max((self.eta - self.actor_lag + 1) * self.groups_per_step - len(self.buffer) - taken, 0)
        p = self.keep_rate()
        extra = self.admission_slack * np.sqrt(room * (1.0 - p)) if room else 0.0
        return int(np.ceil((room + extra) / p - 1e-9))

    def update_admission(self, taken: int = 0) -> None:
        """Hand the current budget to the server (if it takes one)."""
        budget = self.admission_budget(taken)
        setter = getattr(self.server, "set_admission", None)
        if budget is not None and setter is not None:
            setter(budget)

    @staticmethod
    def oldest_version(group) -> int:
        return int(min(int(r.policy_version.to_numpy().min()) for r in group.responses if r.policy_version.shape[0]))

    def _is_stale(self, group, current_version: int) -> bool:
        return is_stale(self.oldest_version(group), current_version, self.eta)

    def _accept(self, group, current_version: int) -> None:
        self.counts["received"] += 1
        reason = check_group(group, current_version, self.limits)
        if reason is not None:
            self.rejected[reason] += 1
            log.warning("group %r rejected: %s", str(group.prompt_id)[:64], reason)
            return
        fate = group_fate([r.outcome_reward for r in group.responses],
                          any(r.finish_reason == "length" for r in group.responses), self.oldest_version(group),
                          current_version, eta=self.eta, low=self.low, high=self.high,
                          drop_truncated=self.drop_truncated)
        self.counts[fate] += 1
        if fate != "stale":  # the keep rate is the filters' (staleness aside)
            self._kept_recent.append(1 if fate == "kept" else 0)
        if fate == "kept":
            if len(self.buffer) >= self.max_buffered:
                self.buffer.popleft()
                self.counts["overflow"] += 1
            self.buffer.append(group)

    def next_batch(self, n: int, current_version: int, poll_s: float = 0.2,
                   should_stop=lambda: False) -> tuple[list, float]:
        """n groups (oldest first) and the seconds spent waiting for them. Returns fewer
        only if ``should_stop()`` turns true while waiting."""
        t0 = time.perf_counter()
        out: list = []
        while len(out) < n:
            while self.buffer and len(out) < n:
                g = self.buffer.popleft()
                if self._is_stale(g, current_version):
                    self.counts["stale"] += 1
                else:
                    out.append(g)
            if len(out) >= n or should_stop():
                break
            self.update_admission(taken=len(out))
            env = self.server.recv_group(timeout=poll_s)
            if env is not None:
                self._accept(env.body, current_version)
        self.update_admission(taken=len(out))  # until the next call: these n are spoken for
        return out, time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        m = {f"system/groups_{k}": float(v) for k, v in self.counts.items()}
        m["system/groups_buffered"] = float(len(self.buffer))
        m["system/ingest/rejected"] = float(sum(self.rejected.values()))
        for reason, n in self.rejected.items():
            m[f"system/ingest/rejected/{reason}"] = float(n)
        m["system/keep_rate"] = self.keep_rate()
        budget = self.admission_budget()
        if budget is not None:
            m["system/admission_budget"] = float(budget)
        return m
