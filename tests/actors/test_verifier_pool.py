"""The verifier pool: many mixed items scored in parallel, none lost; a stuck worker is
killed and replaced; a crashed worker is an error verdict; the queue is bounded."""

import json
import queue
import random
import time

import pytest

from actors.eval import DEFAULT_DATA_DIR
from actors.verifiers.pool import VerifierPool

MATH500 = DEFAULT_DATA_DIR / "math500.jsonl"
KINDS = {"stuck": "pool_kinds:sleep_forever", "die": "pool_kinds:die", "echo": "pool_kinds:echo"}

ADD_PROGRAM = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
WRONG_PROGRAM = "```python\na, b = map(int, input().split())\nprint(a - b)\n```"
LOOP_PROGRAM = "```python\nwhile True:\n    pass\n```"
ADD_TESTS = {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}


def test_pool_200_mixed_items_none_lost():
    rows = [json.loads(line) for line in MATH500.open()][:60]
    items = []  # (kind, response, target, timeout_s, expected statuses)
    for i, r in enumerate(rows):
        items.append(("math", r["solution"], r["answer"], 5.0, {"correct"}))
        other = rows[(i + 7) % len(rows)]["answer"]
        if other != r["answer"]:
            items.append(("math", r["solution"], other, 5.0, {"wrong"}))
    while len(items) < 190:
        items.append(("code", ADD_PROGRAM, ADD_TESTS, 5.0, {"passed"}))
        items.append(("code", WRONG_PROGRAM, ADD_TESTS, 5.0, {"failed"}))
    items = items[:190]  # ~110 math, ~80 code
    items += [("code", LOOP_PROGRAM, ADD_TESTS, 1.5, {"timeout", "failed"})] * 3
    items += [("stuck", "", None, 0.5, {"timeout"})] * 3
    items += [("die", "", None, 1.0, {"error"})] * 2
    items += [("echo", "x", "x", 1.0, {"correct"})] * 2
    assert len(items) == 200
    random.Random(0).shuffle(items)

    t0 = time.monotonic()
    with VerifierPool(num_workers=2, max_queue=16, grace_s=0.5, extra_kinds=KINDS) as pool:
        futs = [pool.submit(k, resp, tgt, timeout_s=to) for k, resp, tgt, to, _ in items]
        verdicts = [f.result(timeout=300) for f in futs]
        stats = pool.stats.as_dict()
    elapsed = time.monotonic() - t0

    assert len(verdicts) == 200
    bad = [(it[0], it[4], v) for it, v in zip(items, verdicts) if v.status not in it[4]]
    assert not bad, bad[:5]
    assert stats["submitted"] == stats["completed"] == 200
    assert stats["killed_workers"] == 3  # the three stuck items
    assert stats["crashed_workers"] == 2
    assert elapsed < 240


def test_stuck_worker_is_killed_within_deadline():
    with VerifierPool(num_workers=1, grace_s=0.5, extra_kinds=KINDS) as pool:
        pool.submit("echo", "a", "a").result(timeout=60)  # worker is up
        t0 = time.monotonic()
        v = pool.submit("stuck", "", None, timeout_s=1.0).result(timeout=30)
        took = time.monotonic() - t0
        assert v.status == "timeout" and v.reward == 0.0
        assert 1.0 <= took < 1.0 + 0.5 + 1.0
        # the replacement worker serves the next item
        assert pool.submit("echo", "b", "b").result(timeout=60).status == "correct"


def test_bounded_queue_applies_back_pressure():
    with VerifierPool(num_workers=1, max_queue=2, grace_s=0.2, extra_kinds=KINDS) as pool:
        futs = [pool.submit("stuck", "", None, timeout_s=2.0)]
        time.sleep(0.5)  # the worker has taken the first item; the queue is empty
        futs += [pool.submit("echo", "a", "a"), pool.submit("echo", "b", "b")]
        with pytest.raises(queue.Full):
            pool.submit("echo", "c", "c", block_timeout_s=0.2)
        assert [f.result(timeout=30).status for f in futs] == ["timeout", "correct", "correct"]


def test_pool_from_config_passes_sandbox_limits():
    from common.config import PrimeRunConfig

    cfg = PrimeRunConfig().verifier
    cfg.sandbox_memory_mb = 64  # a 200 MiB allocation must now fail inside the sandbox
    prog = "```python\nx = bytearray(200 * 1024 * 1024)\nprint(len(x))\n```"
    tests = {"inputs": [""], "outputs": [str(200 * 1024 * 1024)]}
    with VerifierPool.from_config(cfg) as pool:
        assert pool.kind_timeouts_s == {"math": cfg.math_timeout_s, "code": cfg.code_timeout_s}
        v = pool.submit("code", prog, tests).result(timeout=60)
    assert v.status == "failed" and v.reward == 0.0, v


def test_submit_rejects_unknown_kind_and_closed_pool():
    pool = VerifierPool(num_workers=1, extra_kinds=KINDS)
    with pytest.raises(ValueError, match="unknown verifier kind"):
        pool.submit("chess", "e4", "e5")
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit("echo", "a", "a")
