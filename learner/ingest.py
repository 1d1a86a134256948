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
  buffer was full; the oldest waiting group goes); the rule is ``common.admission.group_fate``.
  Kept groups wait in a FIFO buffer; a batch takes the oldest first. Staleness is re-checked
  when a group leaves the buffer.
- ``next_batch(n, current_version)`` returns n groups, blocking until they exist, and the
  seconds it waited (the learner's wait-for-data time).
- Admission (``AdmissionRule`` with B, ``async.admission: capacity``): the budget handed to
  the server (``server.set_admission``) is the rule's (``common.admission``, rules 3–4) for
  accepted = already taken for the batch being built + the buffered groups a batch will still
  train on (not those that will have aged past η when their turn comes). It is renewed
  whenever a group is accepted or taken and when the version advances. Once a batch is
  complete, the groups already received are taken from the server into ``arrived`` (not
  judged: they are checked and given their fate in order at the next call, as if received
  then), so that the budget knows their versions and outcomes. With admission the ``stale``
  backstop catches the variance of the filter and groups from actors that started before
  hearing of a new version.
Not covered: credits and transport accounting (the server's), sharding to ranks.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import numpy as np

from common.admission import KEEP_WINDOW, AdmissionRule, group_fate, is_stale, keep_rate, usable_buffered

log = logging.getLogger(__name__)


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
    def __init__(self, server, rule: AdmissionRule, filter_low: float, filter_high: float,
                 drop_truncated: bool = False, max_buffered: int = 1024, limits: GroupLimits | None = None):
        self.server = server
        self.rule = rule
        self.limits = limits or GroupLimits()
        self.rejected = collections.Counter()  # reason -> groups (check_group)
        self.eta = rule.eta
        self.low, self.high = filter_low, filter_high
        self.drop_truncated = drop_truncated
        self.buffer: collections.deque = collections.deque()
        self.max_buffered = max_buffered
        self.counts = collections.Counter()
        self._kept_recent: collections.deque = collections.deque(maxlen=KEEP_WINDOW)  # 1 kept, 0 filtered
        self.arrived: collections.deque = collections.deque()  # received after a batch was complete, not judged yet
        self.version: int | None = None  # the version the last next_batch built a batch for
        self._taken = 0                  # groups taken for it, as of the last update_admission

    def keep_rate(self) -> float:
        """Recent share of groups the filters keep (staleness aside): ``common.admission.keep_rate``."""
        return keep_rate(self._kept_recent)

    def admission_budget(self, taken: int | None = None) -> int | None:
        """The rule's budget with accepted = ``taken`` (groups already taken for the batch
        being built; default: as at the last update) + the buffered groups, and the arrived
        ones the filters will keep, that a batch will still train on
        (``common.admission.usable_buffered`` at the version of the last ``next_batch``; all
        of them before the first); None without a capacity bound."""
        if not self.rule.capacity:
            return None
        taken = self._taken if taken is None else taken
        kept = self._kept_versions()
        usable = len(kept) if self.version is None else usable_buffered(
            kept, self.version, taken, self.eta, self.rule.groups_per_step)
        return self.rule.budget(usable + taken, self.keep_rate())

    def update_admission(self, taken: int = 0) -> None:
        """Hand the current budget to the server (if it takes one)."""
        self._taken = taken
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
        fate = self._fate(group, self.oldest_version(group), current_version)
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
        self.version = current_version
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
            if self.arrived:  # received after the last batch was complete: judged now, in order
                self._accept(self.arrived.popleft(), current_version)
                continue
            self.update_admission(taken=len(out))
            env = self.server.recv_group(timeout=poll_s)
            if env is not None:
                self._accept(env.body, current_version)
        wait = time.perf_counter() - t0
        if len(out) >= n:  # what has already arrived is taken in (not judged), so the budget sees its versions
            for _ in range(max(self.max_buffered - len(self.arrived), 0)):  # (senders get credit back as it drains)
                env = self.server.recv_group(timeout=0)
                if env is None:
                    break
                self.arrived.append(env.body)
        self.update_admission(taken=len(out))  # until the next call: these n are spoken for
        return out, wait

    def _kept_versions(self) -> list[int]:
        """Oldest versions of the buffered groups, then of the arrived ones the filters will
        keep (their fate but for staleness, which is judged at their turn; a group that
        cannot be judged counts for nothing: it will be rejected)."""
        out = [self.oldest_version(g) for g in self.buffer]
        for g in self.arrived:
            try:
                o = self.oldest_version(g)
                fate = self._fate(g, o, o)  # judged as of its own version: never stale here
            except (ValueError, TypeError, AttributeError):
                continue
            if fate == "kept":
                out.append(o)
        return out

    def _fate(self, group, oldest_version: int, current_version: int) -> str:
        """``common.admission.group_fate`` of ``group`` with this intake's η and filters."""
        return group_fate([r.outcome_reward for r in group.responses],
                          any(r.finish_reason == "length" for r in group.responses), oldest_version,
                          current_version, eta=self.eta, low=self.low, high=self.high,
                          drop_truncated=self.drop_truncated)

    def metrics(self) -> dict[str, float]:
        m = {f"system/groups_{k}": float(v) for k, v in self.counts.items()}
        m["system/groups_buffered"] = float(len(self.buffer))
        m["system/groups_arrived"] = float(len(self.arrived))  # received, to be judged at the next batch
        m["system/ingest/rejected"] = float(sum(self.rejected.values()))
        for reason, n in self.rejected.items():
            m[f"system/ingest/rejected/{reason}"] = float(n)
        m["system/keep_rate"] = self.keep_rate()
        budget = self.admission_budget()
        if budget is not None:
            m["system/admission_budget"] = float(budget)
        return m
