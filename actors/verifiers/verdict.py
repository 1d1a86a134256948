"""The result type every verifier returns.

Contract: ``reward`` is in [0, 1]; ``status`` is one of the verifier's statuses below.
An internal failure is a status (``error`` / ``sandbox_error``), never a silent reward of
0 or 0.5: callers must look at ``status`` before trusting ``reward``.

The one verdict policy (``is_error``), used by training (the actor), the held-out
evaluator and benchmark evaluation alike: ``error`` and ``sandbox_error`` mean the verifier
could not judge (a training group with one is dropped, evaluation counts an error, never a
0); a math ``timeout`` (the checker ran out of time, or the pool killed its worker) is
``math_timeout`` = ``"wrong"`` (reward 0, the default) or ``"error"`` (not judged), the
config field ``verifier.math_timeout``; timeouts are counted on their own either way. A code
``timeout`` is a judgement: the program was too slow (its reward is the tests it passed).
"""

from __future__ import annotations

from dataclasses import dataclass

MATH_STATUSES = ("correct", "wrong", "no_answer", "timeout", "error")
CODE_STATUSES = ("passed", "failed", "timeout", "no_code", "sandbox_error")
# statuses that mean "the verifier could not judge", not "the response is wrong"
FAILURE_STATUSES = ("error", "sandbox_error")
MATH_TIMEOUT_POLICIES = ("wrong", "error")  # verifier.math_timeout


def is_error(status: str, kind: str, math_timeout: str = "wrong") -> bool:
    """True when a verdict of ``status`` from the ``kind`` verifier is not a judgement (see
    the module docstring): its reward must not be used."""
    if math_timeout not in MATH_TIMEOUT_POLICIES:
        raise ValueError(f"math_timeout must be one of {MATH_TIMEOUT_POLICIES}, got {math_timeout!r}")
    if status in FAILURE_STATUSES:
        return True
    return kind == "math" and status == "timeout" and math_timeout == "error"


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
        """True unless the status is an error under every policy (``is_error`` decides)."""
        return self.status not in FAILURE_STATUSES
