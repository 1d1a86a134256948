"""Rank 0's intake: trajectory groups from the transport into step-sized batches.

Contract
--------
- Source: anything with ``recv_group(timeout) -> Envelope | None`` (``LearnerServer``).
- Every received group is either kept or counted under exactly one reason:
  ``stale`` (a token older than current_version − η: the backstop behind admission),
  ``truncated`` (a response hit max_tokens and ``prime.drop_truncated``), ``filtered``
  (mean outcome outside [filter_low, filter_high], PRIME §6), ``overflow`` (the surplus
  buffer was full; the oldest waiting group goes). Kept groups wait in a FIFO buffer; a
  batch takes the oldest first. Staleness is re-checked when a group leaves the buffer.
- ``next_batch(n, current_version)`` returns n groups, blocking until they exist, and the
  seconds it waited (the learner's wait-for-data time).
Not covered: credits and transport accounting (the server's), sharding to ranks.
"""

from __future__ import annotations

import collections
import time

import numpy as np


class Ingest:
    def __init__(self, server, max_staleness: int, filter_low: float, filter_high: float,
                 drop_truncated: bool = False, max_buffered: int = 1024):
        self.server = server
        self.eta = max_staleness
        self.low, self.high = filter_low, filter_high
        self.drop_truncated = drop_truncated
        self.buffer: collections.deque = collections.deque()
        self.max_buffered = max_buffered
        self.counts = collections.Counter()

    @staticmethod
    def oldest_version(group) -> int:
        return int(min(int(r.policy_version.to_numpy().min()) for r in group.responses if r.policy_version.shape[0]))

    def _is_stale(self, group, current_version: int) -> bool:
        return current_version - self.oldest_version(group) > self.eta

    def _accept(self, group, current_version: int) -> None:
        self.counts["received"] += 1
        outcomes = np.array([r.outcome_reward for r in group.responses], dtype=np.float64)
        acc = outcomes.mean()
        if self._is_stale(group, current_version):
            self.counts["stale"] += 1
        elif self.drop_truncated and any(r.finish_reason == "length" for r in group.responses):
            self.counts["truncated"] += 1
        elif not (self.low - 1e-9 <= acc <= self.high + 1e-9):
            self.counts["filtered"] += 1
        else:
            if len(self.buffer) >= self.max_buffered:
                self.buffer.popleft()
                self.counts["overflow"] += 1
            self.buffer.append(group)
            self.counts["kept"] += 1

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
            env = self.server.recv_group(timeout=poll_s)
            if env is not None:
                self._accept(env.body, current_version)
        return out, time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        m = {f"system/groups_{k}": float(v) for k, v in self.counts.items()}
        m["system/groups_buffered"] = float(len(self.buffer))
        return m
