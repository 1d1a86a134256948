"""Math outcome verifier: is the final answer of a model response equal to the reference?

Contract
--------
- Callers: the actor's verifier pool (``actors.verifiers.pool``, one call per response, in
  the main thread of a worker process), evaluation scripts, tests; possibly threads.
- ``verify_math(response, reference, timeout_s=5.0) -> Verdict`` never raises. Statuses:
  ``correct`` (reward 1.0), ``wrong`` (0.0), ``no_answer`` (0.0, nothing extractable from
  the response), ``timeout`` (0.0), ``error`` (0.0, an internal failure, including a
  reference with no answer in it). ``detail`` names the extracted answer and reference.
- The final answer is the content of the LAST ``\\boxed{..}`` / ``\\fbox{..}`` (braces
  matched by a scanner, ``\\boxed 5`` accepted), else the last "the (final) answer is ..."
  phrase. A reference is either a bare answer or a text whose last box is the answer.
- Comparison: a conservative normalised string match first, then exact arithmetic when
  both answers are plain integers / fractions (neither uses sympy), then the
  ``math-verify`` library (sympy) for symbolic / numeric equivalence (``10\\%`` equals
  both ``10`` and ``0.1``). Answers over 2000 characters are compared exactly.
- Time limit: the call returns within about ``timeout_s`` (+ ~0.5 s):
  * main thread, ordinary input: sympy runs in-process under a SIGALRM interval timer that
    raises ``_Deadline`` (a BaseException, so library ``except Exception`` cannot eat it).
    No process is spawned; this is the fast path the verifier pool uses. A caller's own
    SIGALRM timer is restored afterwards.
  * any other thread, or input that could make sympy compute a huge integer inside C code
    (where a signal is only seen once the C call returns: power towers, factorials, big
    operators, big exponents -- see ``is_risky``): the sympy part runs in a persistent
    helper process that is SIGKILLed (and replaced) when it overruns. Helpers are reused.
  * not counted against ``timeout_s``: loading sympy/math-verify once per process and
    starting a helper (each ~1 s), and waiting for a free helper (only when more threads
    than CPUs call at once).
  * residual gap: a long C-level computation that ``is_risky`` misses overruns in the main
    thread; the verifier pool's per-item SIGKILL is the backstop there.
Not covered: answer-format policy beyond equivalence (e.g. "simplest form" demands),
multiple-choice letter semantics beyond string equality, and sandboxing: the inputs are
parsed, never executed (math-verify's Python-expression extractor is not used).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Callable, TypeVar

from actors.verifiers.verdict import Verdict

log = logging.getLogger(__name__)

T = TypeVar("T")

_KILL_MARGIN_S = 0.5  # helper process gets this much past the budget before SIGKILL
_REFIRE_S = 0.1  # the alarm re-fires this often in case a library swallowed _Deadline
_HELPER_START_LIMIT_S = 60.0  # a helper that is not ready by then is an `error`
_MAX_ANSWER_CHARS = 2000  # longer "answers" are compared by exact string equality only
_DETAIL_CHARS = 200

# --------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_PHRASE_RE = re.compile(r"(?i)\b(?:final\s+answer|the\s+answer)\s*(?:is|:)\s*:?")
_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")


def _brace_pairs(s: str) -> dict[int, int]:
    """``{open index: close index}`` for every matched brace pair, in one linear pass."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _match_brace(s: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (``\\{``/``\\}`` skipped)."""
    close = _brace_pairs(s[open_idx:]).get(0)
    return None if close is None else open_idx + close


_BARE_TOKEN_RE = re.compile(r"[^\s${}]+")


def _box_content(s: str, after: int, pairs: dict[int, int]) -> str | None:
    """Argument of a box command ending at ``after``: ``{...}`` or a bare token."""
    i = after
    while i < len(s) and s[i] in " \t":
        i += 1
    if i < len(s) and s[i] == "{":
        close = pairs.get(i)
        return None if close is None else s[i + 1 : close]
    m = _BARE_TOKEN_RE.match(s, i)
    return None if m is None else m.group(0).rstrip(".,;")


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed``/``\\fbox`` in ``text``, else None.
    Linear in ``len(text)`` however many (unterminated) boxes it holds."""
    afters = [m.end() for m in _BOX_RE.finditer(text)]
    pairs = _brace_pairs(text) if afters else {}
    for after in reversed(afters):
        content = _box_content(text, after, pairs)
        if content is not None and content.strip():
            return content.strip()
    return None


def _strip_delimiters(s: str) -> str:
    s = s.strip().strip("*").strip()
    for left, right in _DELIMS:
        if s.startswith(left):
            end = s.find(right, len(left))
            return s[len(left) : end] if end >= 0 else s[len(left) :]
    return s


def _phrase_answer(text: str) -> str | None:
    """The answer after the last "the answer is" / "final answer:" phrase."""
    matches = list(_ANSWER_PHRASE_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].lstrip()
    line = rest.split("\n", 1)[0].strip()
    if not line:
        return None
    if line.startswith(tuple(d[0] for d in _DELIMS)):
        ans = _strip_delimiters(line)
    else:
        ans = _SENTENCE_END_RE.split(line, 1)[0]
    ans = ans.strip().rstrip(".").strip().strip("$").strip()
    return ans or None


def extract_answer(response: str) -> str | None:
    """Final answer of a model response: last box, else the answer phrase, else None."""
    return last_boxed(response) or _phrase_answer(response)


def reference_answer(reference: str) -> str | None:
    """The answer in a reference: its last box if it has one, else the whole string."""
    if _BOX_RE.search(reference):
        return last_boxed(reference)
    ans = _strip_delimiters(reference).strip()
    return ans or None


# ------------------------------------------------------------------------ normalisation

_UNITS = (
    "cm|centimeters?|centimetres?|mm|millimeters?|km|kilometers?|meters?|metres?|inch(?:es)?"
    "|feet|foot|ft|yards?|miles?|units?|square units|sq units|degrees?|cents?|dollars?"
    "|hours?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|mph|pounds?|lbs?"
    "|ounces?|oz|grams?|kg|kilograms?|liters?|litres?|ml|gallons?|points?|people|students"
    "|ways|times|m|g|s"
)
_TEXT_UNIT_RE = re.compile(
    r"\\(?:text|mbox|mathrm|textnormal)\{\s*(?:square\s+|sq\.?\s+|cubic\s+)?(?:" + _UNITS + r")\.?\s*\}"
    r"(?:\^\{?[23]\}?)?\s*$"
)
_PLAIN_UNIT_RE = re.compile(
    r"(?<=[\d}])\s+(?:square\s+|sq\.?\s+|cubic\s+)?(?:" + _UNITS.replace("|m|g|s", "") + r")\.?(?:\^\{?[23]\}?)?\s*$"
)
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|textnormal|mbox|mathrm|mathbf|operatorname)\s*\{")
_SUBSTITUTIONS = (
    (re.compile(r"\\\$"), ""),
    (re.compile(r"\$"), ""),
    (re.compile(r"\\displaystyle(?![A-Za-z])"), ""),
    (re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![A-Za-z])"), ""),
    (re.compile(r",\s*\\!\s*(?=\d{3})"), ","),  # 10,\!080 -> 10,080 (thousands)
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"(?<!\\)\\[!,;:> ]|~"), " "),  # thin spaces; never the row break `\\`
    (re.compile(r"\\[dt]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\[dt]binom(?![A-Za-z])"), r"\\binom"),
    (re.compile(r"\\leq(?![A-Za-z])"), r"\\le"),
    (re.compile(r"\\geq(?![A-Za-z])"), r"\\ge"),
    (re.compile(r"\\neq(?![A-Za-z])"), r"\\ne"),
    (re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|°|\\degree(?![A-Za-z])"), ""),
)
_PERCENT_RE = re.compile(r"\\%|%")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:[, ]\d{3})+(?:\.\d+)?")  # 10,000 / 10\,000
_MIXED_RE = re.compile(r"(-?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}")
_CHOICE_RE = re.compile(r"\(([A-E])\)")


def _read_arg(s: str, i: int) -> tuple[str, int] | None:
    """One TeX argument starting at ``s[i]`` (spaces skipped): ``{..}``, ``\\cmd`` or a char."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        close = _match_brace(s, i)
        return None if close is None else (s[i + 1 : close], close + 1)
    if s[i] == "\\":
        m = re.match(r"\\(?:[A-Za-z]+|.)", s[i:], re.DOTALL)
        return None if m is None else (m.group(0), i + len(m.group(0)))
    return s[i], i + 1


def _brace_args(s: str, command: str, nargs: int) -> str:
    """Rewrite ``\\frac34`` / ``\\frac 3{4}`` / ``\\sqrt2`` into fully braced arguments."""
    out, i, pat = [], 0, re.compile(re.escape(command) + r"(?![A-Za-z])")
    while (m := pat.search(s, i)) is not None:
        out.append(s[i : m.end()])
        j, args = m.end(), []
        for _ in range(nargs):
            if j < len(s) and nargs == 1 and s[j] == "[":  # \sqrt[3]{x}: leave as is
                break
            arg = _read_arg(s, j)
            if arg is None:
                break
            args.append(arg[0])
            j = arg[1]
        if len(args) == nargs:
            out.append("".join("{" + a + "}" for a in args))
            i = j
        else:
            i = m.end()
    out.append(s[i:])
    return "".join(out)


def _unwrap_text(s: str) -> str:
    """``\\text{abc}`` -> ``abc`` (and ``\\mbox``, ``\\mathrm``, ...), braces matched."""
    while (m := _TEXT_WRAP_RE.search(s)) is not None:
        close = _match_brace(s, m.end() - 1)
        if close is None:
            break
        s = s[: m.start()] + s[m.end() : close] + s[close + 1 :]
    return s


def _mixed_to_improper(s: str) -> str:
    """A whole answer ``1\\frac{4}{5}`` becomes ``\\frac{9}{5}``."""
    m = _MIXED_RE.fullmatch(s)
    if m is None:
        return s
    sign, whole, num, den = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
    return f"{sign}\\frac{{{whole * den + num}}}{{{den}}}" if den else s


def clean_answer(ans: str, keep_percent: bool = False) -> str:
    """Conservative LaTeX clean-up of an extracted answer (spaces kept; input to sympy).
    A percent sign is dropped (``10\\%`` == ``10``) unless ``keep_percent`` (then
    math-verify reads it as 1/100: ``10\\%`` == ``0.1``)."""
    s = ans.strip()
    for pat, repl in _SUBSTITUTIONS:
        s = pat.sub(repl, s)
    s = s if keep_percent else _PERCENT_RE.sub("", s)
    s = _TEXT_UNIT_RE.sub("", s.strip())
    s = _unwrap_text(s)
    s = _PLAIN_UNIT_RE.sub("", s.strip())
    s = _brace_args(_brace_args(s, "\\frac", 2), "\\sqrt", 1)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    s = _mixed_to_improper(s)
    if (m := _CHOICE_RE.fullmatch(s)) is not None:
        s = m.group(1)
    return s


def canonical_answer(ans: str) -> str:
    """``clean_answer`` without any whitespace and with single-char ``^{x}``/``_{x}`` unbraced."""
    s = re.sub(r"\s+", "", clean_answer(ans))
    return re.sub(r"([_^])\{(\w)\}", r"\1\2", s)


_INT_RE = re.compile(r"-?\d{1,100}")
_DECIMAL_RE = re.compile(r"-?\d{0,100}\.\d{1,100}")
_FRAC_RE = re.compile(r"(-?)(?:\\frac\{(-?\d{1,100})\}\{(-?\d{1,100})\}|(\d{1,100})/(\d{1,100}))")


def plain_number(ans: str) -> tuple[Fraction, bool] | None:
    """(value, exact) for a canonical answer that is a plain number: an integer or a
    fraction (exact) or a decimal (not exact: math-verify compares those with rounding)."""
    if _INT_RE.fullmatch(ans):
        return Fraction(int(ans)), True
    if _DECIMAL_RE.fullmatch(ans):
        return Fraction(ans), False
    m = _FRAC_RE.fullmatch(ans)
    if m is None:
        return None
    num, den = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
    if int(den) == 0:
        return None
    value = Fraction(int(num), int(den))
    return (-value if m.group(1) else value), True


def _numeric_shortcut(pred: str, ref: str) -> str | None:
    """``correct``/``wrong`` when both canonical answers are plain numbers and that settles
    it without sympy; None when math-verify must decide (a decimal that differs)."""
    a, b = plain_number(pred), plain_number(ref)
    if a is None or b is None:
        return None
    if a[0] == b[0]:
        return "correct"
    return "wrong" if a[1] and b[1] else None


# -------------------------------------------------------------------- sympy comparison


class _Deadline(BaseException):
    """Raised by our SIGALRM handler. A BaseException, so ``except Exception`` in libraries
    cannot swallow it (math-verify catches Exception and its own TimeoutException only)."""


def _call_with_alarm(fn: Callable[[], T], seconds: float) -> T:
    """Run ``fn`` in the main thread; raise ``_Deadline`` into it after ``seconds``.

    The timer re-fires every ``_REFIRE_S`` until disarmed, so a swallowed ``_Deadline`` is
    raised again. A SIGALRM timer the caller had armed is restored afterwards (it fires at
    most ``seconds`` late)."""
    armed = True

    def on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
        if armed:
            raise _Deadline()

    started = time.monotonic()
    prev_handler = signal.signal(signal.SIGALRM, on_alarm)
    prev_delay, prev_interval = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3), _REFIRE_S)
    try:
        return fn()
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, prev_handler if prev_handler is not None else signal.SIG_DFL)
        if prev_delay > 0:
            left = max(prev_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, prev_interval)


_MV_CONFIG: list | None = None  # math-verify extraction config, set by _load_math_verify


def _load_math_verify() -> None:
    """Import math-verify/sympy and parse once (~1 s, once per process). Called outside
    any deadline so the first verdict of a process is not a spurious ``timeout``."""
    global _MV_CONFIG
    if _MV_CONFIG is not None:
        return
    import math_verify.grader
    import math_verify.parser
    from math_verify import LatexExtractionConfig

    # we disable math-verify's signal timeouts on purpose; silence its one-time warning
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    _MV_CONFIG = [LatexExtractionConfig(boxed_match_priority=0)]
    try:
        _math_verify_equal("\\frac{1}{2}", "0.5")
    except Exception:  # a broken library shows up as `error` verdicts, not here
        log.exception("math-verify warm-up failed")


def _math_verify_equal(pred: str, ref: str) -> bool:
    """math-verify's judgement on two cleaned answers (no timeouts of its own: ours apply).
    Looks ``parse``/``verify`` up on the module at each call (tests patch them)."""
    import math_verify

    gold = math_verify.parse("\\boxed{" + ref + "}", extraction_config=_MV_CONFIG, parsing_timeout=None)
    got = math_verify.parse("\\boxed{" + pred + "}", extraction_config=_MV_CONFIG, parsing_timeout=None)
    if not gold or not got:
        return False
    return bool(math_verify.verify(gold, got, timeout_seconds=None, allow_set_relation_comp=True))


def _judge_in_process(pred: str, ref: str, budget_s: float) -> tuple[str, str]:
    """(status, note) from math-verify under the SIGALRM deadline. Main thread only."""
    try:
        _load_math_verify()
        equal = _call_with_alarm(lambda: _math_verify_equal(pred, ref), budget_s)
    except _Deadline:
        return "timeout", f"sympy comparison exceeded {budget_s:.2f} s"
    except Exception as e:  # the library raised: our failure, not the model's
        return "error", f"math-verify raised {type(e).__name__}: {str(e)[:_DETAIL_CHARS]}"
    return ("correct" if equal else "wrong"), "math-verify"


_RISKY_RE = re.compile(r"!|\\binom|\\choose|\\sum|\\prod|\\int|\\lim|\*\*|\\uparrow")


def _exponents(s: str) -> list[str]:
    """The argument of every ``^`` in ``s``."""
    out = []
    for m in re.finditer(r"\^", s):
        arg = _read_arg(s, m.end())
        out.append(arg[0] if arg is not None else "")
    return out


def is_risky(ans: str) -> bool:
    """True for answers that might make sympy compute for long inside C code (where a
    signal cannot interrupt it): factorials, big operators, power towers, big exponents."""
    if _RISKY_RE.search(ans):
        return True
    return any("^" in e or re.search(r"\d{4}", e) for e in _exponents(ans))


# ------------------------------------------------------------------ helper processes


class _Helper:
    """One helper process: JSON lines on stdin -> JSON lines on a private stdout fd."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # import this module without running the package __init__ (which also imports
        # the sibling verifiers): register a bare package object for actors.verifiers
        boot = (
            "import sys, types; pkg = types.ModuleType('actors.verifiers'); "
            f"pkg.__path__ = [{str(Path(__file__).resolve().parent)!r}]; "
            "sys.modules['actors.verifiers'] = pkg; "
            "from actors.verifiers.math_verifier import _helper_main; _helper_main()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=root
        )
        self._buf = b""
        self.ready = False

    def _read_line(self, limit_s: float) -> dict | None:
        """Next JSON line, or None when ``limit_s`` passes first. EOFError if it died."""
        deadline = time.monotonic() + limit_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"helper exited with code {self.proc.poll()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def wait_ready(self) -> None:
        if not self.ready:
            if self._read_line(_HELPER_START_LIMIT_S) is None:
                raise TimeoutError(f"helper not ready after {_HELPER_START_LIMIT_S:.0f} s")
            self.ready = True

    def ask(self, pred: str, ref: str, budget_s: float) -> dict | None:
        """The helper's verdict dict, or None if it overran ``budget_s`` + margin."""
        self.proc.stdin.write(json.dumps({"pred": pred, "ref": ref, "budget_s": budget_s}).encode() + b"\n")
        self.proc.stdin.flush()
        return self._read_line(budget_s + _KILL_MARGIN_S)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _HelperPool:
    """Reusable helper processes, at most ``max_helpers`` busy at once."""

    def __init__(self, max_helpers: int) -> None:
        self._idle: list[_Helper] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_helpers)
        # helpers are started from one long-lived thread: the helper's parent-death signal
        # fires when the *thread* that started it exits, so it must not be a pool thread
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="math-verifier-spawn")

    def _take(self) -> _Helper:
        with self._lock:
            while self._idle:
                helper = self._idle.pop()
                if helper.alive():
                    return helper
                helper.kill()
        return self._spawner.submit(_Helper).result()

    def _put(self, helper: _Helper) -> None:
        with self._lock:
            self._idle.append(helper)

    def _replace_soon(self) -> None:
        """Start a replacement in the background so the next caller finds it warm."""
        try:
            self._spawner.submit(lambda: self._put(_Helper()))
        except RuntimeError:  # interpreter shutting down: the next caller starts one
            pass

    def judge(self, pred: str, ref: str, budget_s: float) -> tuple[str, str]:
        """(status, note) from a helper; the helper is killed if it overruns."""
        with self._slots:
            helper = None
            try:
                helper = self._take()
                helper.wait_ready()  # startup is not part of the budget
                t0 = time.monotonic()
                reply = helper.ask(pred, ref, budget_s)
            except Exception as e:  # failed to start, died, or sent garbage
                if helper is not None:
                    helper.kill()
                return "error", f"helper process failed: {type(e).__name__}: {str(e)[:_DETAIL_CHARS]}"
            if reply is None:
                helper.kill()
                self._replace_soon()
                return "timeout", f"helper process killed after {time.monotonic() - t0:.2f} s"
            self._put(helper)
            return reply["status"], reply["note"] + " (helper process)"

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for helper in idle:
            helper.kill()
        self._spawner.shutdown(wait=False)


_POOL: _HelperPool | None = None
_POOL_LOCK = threading.Lock()


def _helper_pool() -> _HelperPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _HelperPool(max_helpers=max(2, os.cpu_count() or 2))
            atexit.register(_POOL.close)
        return _POOL


def _set_parent_death_signal() -> None:
    """Linux: SIGKILL this process when its parent dies (best effort elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _helper_main() -> None:
    """Entry point of a helper process: answer requests until stdin closes."""
    _set_parent_death_signal()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    _load_math_verify()
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        req = json.loads(line)
        status, note = _judge_in_process(req["pred"], req["ref"], req["budget_s"])
        out.write(json.dumps({"status": status, "note": note}).encode() + b"\n")
        out.flush()


# ----------------------------------------------------------------------------- verdict


def _symbolic(pred: str, ref: str, budget_s: float) -> tuple[str, str]:
    """math-verify's judgement within ``budget_s``: in-process when safe, else a helper."""
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and not is_risky(pred) and not is_risky(ref):
        return _judge_in_process(pred, ref, budget_s)
    return _helper_pool().judge(pred, ref, budget_s)


def _short(s: str | None) -> str:
    if s is None:
        return "None"
    return repr(s if len(s) <= _DETAIL_CHARS else s[:_DETAIL_CHARS] + "...")


def _compare(pred: str, ref: str, timeout_s: float, started: float) -> tuple[str, str]:
    """(status, how) for two extracted answers: string match, then math-verify with the
    percent sign dropped, then (only if one has a ``%``) with it read as 1/100."""
    if max(len(pred), len(ref)) > _MAX_ANSWER_CHARS:  # no answer is that long: exact match only
        return ("correct" if pred == ref else "wrong"), f"exact (over {_MAX_ANSWER_CHARS} chars)"
    pred_canon, ref_canon = canonical_answer(pred), canonical_answer(ref)
    if pred_canon == ref_canon:
        return "correct", "string"
    if (status := _numeric_shortcut(pred_canon, ref_canon)) is not None:
        return status, "number"
    status, how = "wrong", "string (empty after normalisation)"
    for keep_percent in (False, True) if "%" in pred + ref else (False,):
        pred_clean, ref_clean = clean_answer(pred, keep_percent), clean_answer(ref, keep_percent)
        if not pred_clean or not ref_clean:
            continue
        budget = timeout_s - (time.monotonic() - started)
        if budget <= 0:
            return "timeout", "budget spent before comparison"
        status, how = _symbolic(pred_clean, ref_clean, budget)
        if status != "wrong":
            break
    return status, how


def _judge(response: str, reference: str, timeout_s: float, started: float) -> tuple[str, str]:
    """(status, detail) for one response; exceptions propagate to ``verify_math``."""
    ref = reference_answer(reference)
    if ref is None:
        return "error", f"reference has no answer: {_short(reference)}"
    pred = extract_answer(response)
    if pred is None:
        return "no_answer", f"no boxed answer or answer phrase; reference={_short(ref)}"
    status, how = _compare(pred, ref, timeout_s, started)
    return status, f"answer={_short(pred)} reference={_short(ref)} via={how}"


def verify_math(response: str, reference: str, timeout_s: float = 5.0) -> Verdict:
    """Judge ``response``'s final answer against ``reference``; see the module docstring."""
    started = time.monotonic()
    try:
        if not isinstance(response, str):
            raise TypeError(f"response must be str, got {type(response).__name__}")
        if not isinstance(reference, (str, int, float)):
            raise TypeError(f"reference must be str or a number, got {type(reference).__name__}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        status, detail = _judge(response, str(reference), timeout_s, started)
    except _Deadline:  # only if the alarm fired outside the guarded region
        status, detail = "timeout", "deadline reached"
    except Exception as e:
        log.exception("verify_math failed")
        status, detail = "error", f"{type(e).__name__}: {str(e)[:_DETAIL_CHARS]}"
    reward = 1.0 if status == "correct" else 0.0
    return Verdict(reward=reward, status=status, detail=detail, elapsed_s=time.monotonic() - started)
