"""Outcome reward for model-written Python: run it against tests in the sandbox.

Contract
--------
- Callers: the verifier pool (``actors.verifiers.pool``), benchmarks and tests, as
  ``verify_code(response, tests, timeout_s=5.0) -> Verdict``.
- Statuses: ``passed`` (reward 1.0), ``failed`` (reward passed / min(n, 10), capped at 1 --
  so 10+ passing of more than 10 tests earns 1.0 while still ``failed``; assert-based
  tests 0), ``timeout`` (the time ran out before any test passed),
  ``no_code`` (nothing to run), ``sandbox_error`` (the sandbox could not run, the tests are
  malformed, or an internal error: never a silent reward). ``detail`` says why.
- ``timeout_s`` bounds the wall time of the whole call (sandbox start-up included; the
  teardown adds a few ms, see ``sandbox``); tests not reached in time count as failed.
  A case's stdout+stderr is capped at ``limits.max_output_bytes`` (over: it fails).
- Python semantics per case: the program runs as ``__main__`` (stdin/stdout form) with the
  standard library only; non-daemon threads are joined, atexit handlers run, streams are
  flushed, and a non-zero exit code fails the case.
- The program is the last ```python (```py, ```python3, any case) fenced block, else the
  last bare ``` block, else the whole response when it has no fenced block at all.
- Test forms (``tests`` may also be the JSON text of one of these dicts):
  stdin/stdout ``{"inputs": [str], "outputs": [str]}`` (outputs compared line by line
  without trailing whitespace / trailing blank lines, or token by token; a list of lines
  is accepted for a str); call-based ``{"fn_name", "inputs": [[args]], "outputs": [value]}``
  (a top-level function or a ``Solution`` method; the return value comes back as JSON
  text, compared after a JSON round trip with floats within 1e-6, tuples equal to lists,
  and an expected one-element list also matching its element, as APPS-style data wraps
  return values); assert-based HumanEval ``{"prefix", "test", "entry_point"}`` (pass iff
  ``check(entry_point)`` returns; a nonce the harness sends only after it returned guards
  against ``os._exit(0)`` / ``sys.exit(0)`` before the checks).
- All test cases of one call run in ONE sandbox: a harness (``_HARNESS_SOURCE``) forks a
  fresh child per case (own stdin file, own output pipes, its own process group) and
  streams one frame per finished case, so a case costs a fork, not a sandbox start-up.
  Expected outputs never enter the sandbox; the comparison happens here.
Not covered: how the sandbox isolates (``sandbox``). The nonce and the result pipe guard
against accidents and lazy exits, not against a program that deliberately digs into its
own process (reads the nonce, returns objects whose ``__eq__`` is always True): the
checks run in the same interpreter as the program, as in HumanEval itself.
"""

from __future__ import annotations

import json
import logging
import marshal
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from actors.verifiers.sandbox import SandboxLimits, SandboxUnavailable, run_python, sandbox_available
from actors.verifiers.verdict import Verdict

log = logging.getLogger(__name__)

REWARD_DENOMINATOR_CAP = 10  # PRIME: reward = passed / min(n_tests, 10), capped at 1
FLOAT_TOL = 1e-6
_STDERR_TAIL = 2048  # bytes of a case's stderr the harness sends back
_RESERVE_S = 0.05  # of the budget kept for parsing and judging after the sandbox
_FRAME_OVERHEAD = 512
_MAX_TOTAL_OUTPUT = 64 << 20  # bytes one call may bring back from the sandbox, all cases together

# ---------------------------------------------------------------------------------------
# extracting the program

_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
_OPEN_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n", re.MULTILINE)
_PY_TAGS = {"python", "py", "python3", "py3"}


def extract_code(response: str) -> tuple[str | None, bool]:
    """(program, fenced): the last python block, else the last bare block, else the whole
    response when it has no fence at all; ``None`` when its fences hold no Python."""
    blocks = [(m.group(1).lower(), m.group(2), m.end()) for m in _FENCE.finditer(response)]
    end_of_closed = blocks[-1][2] if blocks else 0
    tail = _OPEN_FENCE.search(response, end_of_closed)  # an unterminated last block (cut off)
    if tail and tail.group(1).lower() in _PY_TAGS | {""}:
        blocks.append((tail.group(1).lower(), response[tail.end():], len(response)))
    for wanted in (_PY_TAGS, {""}):
        picked = [body for tag, body, _ in blocks if tag in wanted]
        if picked:
            return picked[-1], True
    if "```" in response:
        return None, True
    return response, False


def _defines(source: str, name: str) -> bool:
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", source, re.MULTILINE) is not None


# ---------------------------------------------------------------------------------------
# the in-sandbox harness (runs as the sandbox's main program)

_HARNESS_SOURCE = r'''
# start-up cost matters (one run per verdict): no json/re/enum/signal/traceback imports
# unless needed; the config is marshal data written by the verifier.
import builtins, marshal, os, select, sys

BOX = os.path.dirname(__file__)
with open(os.path.join(BOX, "cases.marshal"), "rb") as _f:
    CFG = marshal.load(_f)
MODE, CAP, TAIL = CFG["mode"], CFG["cap"], CFG["stderr_tail"]
SIGKILL = 9
STREAMS = []  # a case's own stdout/stderr, flushed at its end even if the program rebinds sys.stdout
NONCE = os.urandom(16).hex().encode()
CHAN = os.dup(1)  # frames go here; children do not hold it
_null = os.open(os.devnull, os.O_RDWR)
os.dup2(_null, 1)
if MODE == "call":
    import json  # before forking, so each case does not import it again


def send(kind, i=-1, rc=0, over=False, sentinel=False, blobs=()):
    """A frame: 'kind i rc over sentinel size...' then the raw blobs."""
    sizes = " ".join(str(len(b)) for b in blobs)
    data = f"{kind} {i} {rc} {int(over)} {int(sentinel)} {sizes}\n".encode() + b"".join(blobs)
    while data:
        data = data[os.write(CHAN, data):]


def compile_program():
    last = None
    for src in CFG["sources"]:
        try:
            return compile(src, "solution.py", "exec"), None
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            last = last or e
    import traceback
    return None, "".join(traceback.format_exception_only(type(last), last)).strip()


def child(code, case):
    rc = 1
    try:
        stdin_path = os.path.join(BOX, case["stdin"]) if case.get("stdin") else os.devnull
        fd = os.open(stdin_path, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
        # fresh buffered streams on the case's descriptors (sys.stdin.buffer.readline is fast)
        text = {"encoding": "utf-8", "closefd": False}
        sys.stdin = sys.__stdin__ = open(0, "r", errors="replace", **text)
        sys.stdout = sys.__stdout__ = open(1, "w", errors="backslashreplace", newline="\n", **text)
        sys.stderr = sys.__stderr__ = open(2, "w", 1, errors="backslashreplace", newline="\n", **text)
        STREAMS[:] = [sys.stdout, sys.stderr]
        name = "__main__" if MODE == "stdio" else "solution"
        module = type(sys)(name)  # registered: dataclasses, pickle and friends look it up
        module.__file__, module.__builtins__ = "solution.py", builtins
        sys.modules[name] = module
        g = module.__dict__
        exec(code, g)
        if MODE == "call":
            fn = g.get(CFG["fn_name"])
            if fn is None and isinstance(g.get("Solution"), type):
                fn = getattr(g["Solution"](), CFG["fn_name"], None)
            if not callable(fn):
                raise NameError(f"function {CFG['fn_name']!r} is not defined (nor a Solution method)")
            result = fn(*case["args"])
            payload = json.dumps(result, default=to_json).encode()
            os.write(RES_W, payload)
        elif MODE == "assert":
            entry = CFG["entry_point"]
            if "check" not in g or entry not in g:
                raise NameError(f"check or {entry!r} is not defined")
            g["check"](g[entry])
            os.write(RES_W, NONCE)
        rc = 0
    except SystemExit as e:
        if MODE != "stdio":
            sys.stderr.write(f"SystemExit({e.code!r}) before the tests finished\n")
            rc = 1
        elif e.code is None or isinstance(e.code, int):
            rc = (e.code or 0) & 0xFF
        else:
            sys.stderr.write(f"{e.code}\n")
            rc = 1
    except BaseException:
        try:
            import traceback
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        os._exit(finish(rc))


def finish(rc):
    """What interpreter shutdown would do: join threads, run atexit, flush; the exit code."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:  # e.g. main() run in a big-stack thread
            for t in threading.enumerate():
                if t is not threading.main_thread() and not t.daemon:
                    t.join()
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        rc = rc or 1
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, *STREAMS)}.values():
        try:
            stream.flush()
        except BaseException:
            rc = rc or 1
    return rc


def to_json(obj):
    if isinstance(obj, (set, frozenset)):
        try:
            return sorted(obj)
        except TypeError:
            return list(obj)
    raise TypeError(f"return value of type {type(obj).__name__} is not JSON serializable")


def run_case(code, i, case):
    global RES_W
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    res_r, RES_W = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if CFG["own_pgid"]:  # sandboxed: the PID namespace contains everything anyway
                os.setpgid(0, 0)
            os.close(CHAN)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (out_r, err_r, res_r, out_w, err_w, _null):
                os.close(fd)
        except BaseException:
            os._exit(1)
        child(code, case)
    for fd in (out_w, err_w, RES_W):
        os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        pidfd = None
    bufs = {out_r: [], err_r: [], res_r: []}
    live = set(bufs)
    state = {"total": 0, "over": False, "status": None}

    def take(fd, data):
        bufs[fd].append(data)
        state["total"] += len(data)
        state["over"] = state["total"] > CAP

    def exited():
        if state["status"] is None:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                state["status"] = status
        return state["status"] is not None

    done = False
    while live and not state["over"] and not done:
        waitset = list(live) + ([pidfd] if pidfd is not None else [])
        ready = select.select(waitset, [], [], None if pidfd is not None else 0.05)[0]
        done = (pidfd in ready) if pidfd is not None else exited()
        for fd in ready:
            if fd == pidfd or state["over"]:
                continue
            data = os.read(fd, 1 << 16)
            if data:
                take(fd, data)
            else:
                live.discard(fd)
    if done and not state["over"]:  # detached grandchildren may hold the pipes: drain, then stop
        for fd in list(live):
            os.set_blocking(fd, False)
            try:
                while not state["over"]:
                    data = os.read(fd, 1 << 16)
                    if not data:
                        break
                    take(fd, data)
            except BlockingIOError:
                pass
    try:
        if CFG["own_pgid"]:
            os.killpg(pid, SIGKILL)
        elif state["status"] is None:
            os.kill(pid, SIGKILL)
    except OSError:
        pass
    if state["status"] is None:
        state["status"] = os.waitpid(pid, 0)[1]
    for fd in [pidfd, out_r, err_r, res_r]:
        if fd is not None:
            os.close(fd)
    out, err, res = (b"".join(bufs[fd]) for fd in (out_r, err_r, res_r))
    if state["over"]:  # the case failed; its output is not needed and may exceed the frame budget
        out = err = res = b""
    sentinel = MODE == "assert" and res == NONCE
    if MODE == "assert":
        res = b""
    send("case", i, os.waitstatus_to_exitcode(state["status"]), state["over"], sentinel, (out, err[-TAIL:], res))


def main():
    send("hello")
    code, error = compile_program()
    if code is None:
        send("compile_error", blobs=(error.encode("utf-8", "replace"),))
        return
    for i, case in enumerate(CFG["cases"]):
        run_case(code, i, case)
    send("done")


main()
'''


# ---------------------------------------------------------------------------------------
# judging


@dataclass(frozen=True)
class _Frame:
    kind: str  # "hello" | "compile_error" | "case" | "done"
    i: int  # case index ("case" frames)
    rc: int  # the case's exit code (negative: killed by that signal)
    over: bool  # the case hit the output cap
    sentinel: bool  # assert mode: check() returned
    blobs: tuple[bytes, ...]  # case: (stdout, stderr tail, result); compile_error: (message,)


def _parse_frames(stream: bytes) -> list[_Frame]:
    """Frames: a header line 'kind i rc over sentinel size...', then the raw blobs; a cut-off
    or malformed tail is dropped."""
    frames, pos = [], 0
    while pos < len(stream):
        nl = stream.find(b"\n", pos, pos + 256)
        if nl < 0:
            break
        try:
            kind, i, rc, over, sentinel, *sizes = stream[pos:nl].decode("ascii").split()
            numbers = [int(i), int(rc), int(over), int(sentinel)] + [int(n) for n in sizes]
        except (ValueError, UnicodeDecodeError):
            break
        pos = nl + 1
        if any(n < 0 for n in numbers[4:]) or pos + sum(numbers[4:]) > len(stream):
            break
        blobs = []
        for size in numbers[4:]:
            blobs.append(stream[pos:pos + size])
            pos += size
        frames.append(_Frame(kind, numbers[0], numbers[1], bool(numbers[2]), bool(numbers[3]), tuple(blobs)))
    return frames


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def outputs_match(got: str, expected: str) -> bool:
    """stdin/stdout comparison: equal lines (trailing whitespace and blank lines ignored),
    or equal whitespace-separated tokens."""
    return _lines(got) == _lines(expected) or got.split() == expected.split()


def values_match(got: Any, expected: Any) -> bool:
    """Call-based comparison of JSON values: floats within 1e-6, lists/dicts elementwise."""
    if isinstance(got, float) or isinstance(expected, float):
        if isinstance(got, (int, float)) and isinstance(expected, (int, float)) \
                and not isinstance(got, bool) and not isinstance(expected, bool):
            if math.isnan(got) or math.isnan(expected):
                return math.isnan(got) and math.isnan(expected)
            return math.isclose(got, expected, rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)
        return False
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(values_match(g, e) for g, e in zip(got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(values_match(got[k], expected[k]) for k in got)
    return got == expected


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def call_result_matches(got: Any, expected: Any) -> bool:
    expected = _json_roundtrip(expected)
    if values_match(got, expected):
        return True
    return isinstance(expected, list) and len(expected) == 1 and values_match(got, expected[0])


def _as_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def _short(text: str, n: int = 160) -> str:
    """One line of at most ``n`` characters."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def _short_repr(text: str, n: int = 160) -> str:
    text = repr(text)
    return text if len(text) <= n else text[: n - 4] + "...'"


def _last_line(err: bytes) -> str:
    lines = [ln for ln in err.decode("utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


# ---------------------------------------------------------------------------------------
# the entry point


@dataclass(frozen=True)
class _Plan:
    """What to send into the sandbox and how to judge what comes back."""

    mode: str  # "stdio" | "call" | "assert"
    sources: list[str]  # program candidates: the first that compiles is run
    cases: list[dict]  # per case: {"stdin": file name} or {"args": [...]}
    stdin_files: dict[str, str]
    expected: list[Any]
    extra: dict


class _BadTests(ValueError):
    pass


def _plan(response: str, tests: Any) -> _Plan | None:
    """The run plan, or None when there is no code; raises _BadTests on malformed tests."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError as e:
            raise _BadTests(f"tests are not JSON: {e}") from None
    if not isinstance(tests, dict):
        raise _BadTests(f"tests must be a dict, got {type(tests).__name__}")
    if tests.get("entry_point") and "test" in tests:
        return _plan_assert(response, tests)
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
        raise _BadTests("tests need non-empty 'inputs' and 'outputs' lists of equal length")
    program, _ = extract_code(response)
    if program is None or not program.strip():
        return None
    if tests.get("fn_name"):
        for args in inputs:
            if not isinstance(args, list):
                raise _BadTests("call-based inputs must be lists of arguments")
        cases = [{"args": args} for args in inputs]
        return _Plan("call", [program], cases, {}, outputs, {"fn_name": str(tests["fn_name"])})
    files = {f"stdin_{i}": _stdin_text(inp) for i, inp in enumerate(inputs)}
    cases = [{"stdin": f"stdin_{i}"} for i in range(len(inputs))]
    return _Plan("stdio", [program], cases, files, [_as_text(o) for o in outputs], {})


def _stdin_text(value: Any) -> str:
    if isinstance(value, list):
        return "".join(f"{line}\n" for line in value)
    return str(value)


def _plan_assert(response: str, tests: dict) -> _Plan | None:
    prefix, entry = str(tests.get("prefix", "")), str(tests["entry_point"])
    block, fenced = extract_code(response)
    if block is None or not block.strip():
        return None
    if fenced and _defines(block, entry):
        # keep the prompt in front when it still compiles (its imports and helpers stay
        # available; the block's definition overrides the stub), else the block alone
        sources = [f"{prefix}\n{block}", block]
    else:
        sources = [prefix + block]
    test = str(tests["test"])
    sources = [f"{src}\n\n{test}\n" for src in sources]
    return _Plan("assert", sources, [{}], {}, [None], {"entry_point": entry})


def verify_code(
    response: str,
    tests: dict | str,
    timeout_s: float = 5.0,
    *,
    limits: SandboxLimits | dict | None = None,
    allow_unsandboxed: bool = False,
) -> Verdict:
    """Run the program in ``response`` against ``tests`` in the sandbox; see the module doc."""
    start = time.monotonic()

    def verdict(reward: float, status: str, detail: str) -> Verdict:
        return Verdict(reward, status, detail, time.monotonic() - start)

    try:
        try:
            plan = _plan(response, tests)
        except _BadTests as e:
            return verdict(0.0, "sandbox_error", f"malformed tests: {e}")
        if plan is None:
            return verdict(0.0, "no_code", "no Python code in the response")
        if isinstance(limits, dict):  # from the verifier pool / config, as plain data
            limits = SandboxLimits(**limits)
        return _execute(plan, start + timeout_s, limits or SandboxLimits(), allow_unsandboxed, verdict)
    except SandboxUnavailable as e:
        return verdict(0.0, "sandbox_error", f"sandbox unavailable: {e}")
    except Exception as e:  # an internal error is a status, never a reward
        log.exception("code verifier failed")
        return verdict(0.0, "sandbox_error", f"internal error: {type(e).__name__}: {e}")


def _execute(plan: _Plan, deadline: float, limits: SandboxLimits, allow_unsandboxed: bool, verdict) -> Verdict:
    per_case = limits.max_output_bytes
    # unsandboxed, children stay in the harness's process group so the final kill reaches them
    own_pgid = sandbox_available()[0]
    cfg = {"mode": plan.mode, "sources": plan.sources, "cases": plan.cases, "cap": per_case,
           "stderr_tail": _STDERR_TAIL, "own_pgid": own_pgid, **plan.extra}
    files = {"harness.py": _HARNESS_SOURCE, "cases.marshal": marshal.dumps(cfg), **plan.stdin_files}
    n = len(plan.cases)
    # room for every case's capped output (the harness kills a case past ``per_case``),
    # within an overall ceiling (cases past it count as not run)
    cap = min(n * (per_case + _STDERR_TAIL + _FRAME_OVERHEAD), max(_MAX_TOTAL_OUTPUT, per_case + _STDERR_TAIL))
    cap += 4 * _FRAME_OVERHEAD
    budget = deadline - time.monotonic() - _RESERVE_S
    if budget <= 0:
        return verdict(0.0, "timeout", "no time left to run the program")
    res = run_python(files, "harness.py", timeout_s=budget, limits=limits, output_cap=cap,
                     allow_unsandboxed=allow_unsandboxed)
    frames = _parse_frames(res.stdout)
    if not frames or frames[0].kind != "hello":
        why = _short(res.stderr.decode("utf-8", errors="replace").strip()[-400:], 400)
        state = "timed out" if res.timed_out else f"exit {res.returncode}"
        return verdict(0.0, "sandbox_error", f"harness did not start ({state}): {why}")
    errors = [f for f in frames if f.kind == "compile_error" and f.blobs]
    if errors:
        err = errors[0].blobs[0].decode("utf-8", errors="replace")
        return verdict(0.0, "failed", f"does not compile: {_short(err, 300)}")
    results = {f.i: f for f in frames if f.kind == "case" and len(f.blobs) == 3}
    passed, first_failure = 0, ""
    for i in range(n):
        frame = results.get(i)
        ok, why = _judge(plan, i, frame, res.timed_out)
        passed += ok
        if not ok and not first_failure:
            first_failure = why
    if passed == n:
        return verdict(1.0, "passed", f"all {n} tests passed")
    ran = len(results)
    reward = 0.0 if plan.mode == "assert" else min(1.0, passed / min(n, REWARD_DENOMINATOR_CAP))
    if res.timed_out and ran < n:
        note = f"time limit reached after {ran} of {n} tests"
        if passed == 0:
            return verdict(0.0, "timeout", f"{note}; first failure: {first_failure}")
        return verdict(reward, "failed", f"{passed}/{n} passed; {note}; first failure: {first_failure}")
    if res.output_overflow:
        first_failure += " (sandbox output limit)"
    return verdict(reward, "failed", f"{passed}/{n} passed; first failure: {first_failure}")


def _judge(plan: _Plan, i: int, frame: _Frame | None, timed_out: bool) -> tuple[bool, str]:
    if frame is None:
        why = "did not finish within the time limit" if timed_out else "not run (the harness died)"
        return False, f"test {i}: {why}"
    out, err, res = frame.blobs
    if frame.over:
        return False, f"test {i}: output limit exceeded"
    rc = frame.rc
    if plan.mode == "assert":
        if rc == 0 and frame.sentinel:
            return True, ""
        reason = _last_line(err) or (f"exit code {rc}" if rc else "exited before the checks finished")
        return False, f"test {i}: {_short(reason, 300)}"
    if rc != 0:
        reason = _last_line(err) or _signal_text(rc)
        return False, f"test {i}: runtime error: {_short(reason, 300)}"
    if plan.mode == "stdio":
        got = out.decode("utf-8", errors="replace")
        if outputs_match(got, plan.expected[i]):
            return True, ""
        return False, f"test {i}: expected {_short_repr(plan.expected[i])}, got {_short_repr(got)}"
    try:
        value = json.loads(res.decode("utf-8"))
    except ValueError:
        return False, f"test {i}: no JSON return value ({_short(res.decode('utf-8', 'replace'))!r})"
    if call_result_matches(value, plan.expected[i]):
        return True, ""
    return False, f"test {i}: expected {_short(json.dumps(plan.expected[i]))}, got {_short(json.dumps(value))}"


def _signal_text(rc: Any) -> str:
    if isinstance(rc, int) and rc < 0:
        return f"killed by signal {-rc}"
    return f"exit code {rc}"
