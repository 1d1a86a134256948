"""Verifiers: outcome rewards for math answers and sandboxed model-written code.

``from actors.verifiers import verify_math, verify_code`` is a contract:
- ``verify_math(response, reference, timeout_s=5.0) -> Verdict``
- ``verify_code(response, tests, timeout_s=5.0) -> Verdict``
"""

from actors.verifiers.verdict import CODE_STATUSES, MATH_STATUSES, Verdict
from actors.verifiers.math_verifier import verify_math
from actors.verifiers.code_verifier import verify_code

__all__ = ["Verdict", "MATH_STATUSES", "CODE_STATUSES", "verify_math", "verify_code"]
