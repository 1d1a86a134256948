"""The result type every verifier returns.

Contract: ``reward`` is in [0, 1]; ``status`` is one of the verifier's statuses below.
An internal failure is a status (``error`` / ``sandbox_error`` / ``timeout``), never a
silent reward of 0 or 0.5: callers must look at ``status`` before trusting ``reward``
(``Verdict.ok`` is False for those).
"""

from __future__ import annotations

from dataclasses import dataclass

MATH_STATUSES = ("correct", "wrong", "no_answer", "timeout", "error")
CODE_STATUSES = ("passed", "failed", "timeout", "no_code", "sandbox_error")
# statuses that mean "the verifier could not judge", not "the response is wrong"
FAILURE_STATUSES = ("error", "sandbox_error")


@dataclass(frozen=True)
class Verdict:
    reward: float
    status: str
    detail: str = ""  # human-readable reason (extracted answer, failing test, error text)
    elapsed_s: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.reward <= 1.0:
            raise ValueError(f"reward {self.reward} outside [0, 1]")
        if self.status not in MATH_STATUSES + CODE_STATUSES:
            raise ValueError(f"unknown verdict status {self.status!r}")

    @property
    def ok(self) -> bool:
        """True when the verifier reached a judgement (the reward is meaningful)."""
        return self.status not in FAILURE_STATUSES
