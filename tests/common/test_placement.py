"""common/placement.py: CPU lists, shares per process, and a real process placed by it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, PlacementConfig, load_config
from common.placement import PlacementError, parse_cpus, plan, share

ROOT = Path(__file__).resolve().parents[2]


def test_parse_cpus_by_hand():
    assert parse_cpus("") == [] and parse_cpus(None) == []
    assert parse_cpus("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_cpus(" 5, 2-4 ,2") == [2, 3, 4, 5]
    for bad in ("a", "3-1", "1-", "-2", "0-2-4"):
        with pytest.raises(PlacementError):
            parse_cpus(bad)


def test_share_by_hand_and_against_a_naive_split():
    assert share([0, 1, 2, 3, 4], 0, 2) == [0, 1, 2] and share([0, 1, 2, 3, 4], 1, 2) == [3, 4]
    assert share([4, 5], 2, 3) == [4]  # fewer CPUs than processes: round-robin
    assert share([], 0, 4) == []
    with pytest.raises(PlacementError):
        share([0, 1], 2, 2)
    for n_cpu in range(1, 9):
        cpus = list(range(10, 10 + n_cpu))
        for count in range(1, n_cpu + 1):
            parts = [share(cpus, i, count) for i in range(count)]
            assert sum(parts, []) == cpus  # a partition, in order
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_plan_threads_follow_the_share_unless_set():
    p = PlacementConfig(learner_cpus="0-3", actor_cpus="4-5", actor_threads=None, evaluator_nice=10)
    assert plan(p, "learner", 1, 2) == {"cpus": [2, 3], "threads": 2, "nice": 0}
    assert plan(p, "actor", 0, 2) == {"cpus": [4], "threads": 1, "nice": 0}
    assert plan(p, "evaluator") == {"cpus": [], "threads": 1, "nice": 10}
    assert plan(PlacementConfig(), "learner") == {"cpus": [], "threads": None, "nice": 0}


def test_config_refuses_a_bad_cpu_list():
    with pytest.raises(ConfigError, match="actor_cpus"):
        load_config(None, ["placement.actor_cpus=0-x"])
    with pytest.raises(ConfigError, match="evaluator_nice"):
        load_config(None, ["placement.evaluator_nice=25"])


def _placed_child(overrides: list[str], role: str, index: int, count: int) -> dict:
    code = f"""
import json, os, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from common.config import load_config
from common.placement import apply
cfg = load_config(None, {overrides!r})
p = apply(cfg.placement, {role!r}, {index}, {count})
print(json.dumps({{"plan": p, "affinity": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                  "nice": os.nice(0)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise PlacementError(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_real_process_lands_where_it_is_told():
    cpus = sorted(os.sched_getaffinity(0))
    last = cpus[-1]
    got = _placed_child([f"placement.actor_cpus={cpus[0]},{last}", "placement.actor_nice=3"], "actor", 1, 2)
    assert got["affinity"] == [last] and got["threads"] == 1 and got["nice"] == 3
    got = _placed_child([f"placement.learner_cpus={','.join(map(str, cpus))}"], "learner", 0, 1)
    assert got["affinity"] == cpus and got["threads"] == len(cpus)
    with pytest.raises(PlacementError, match="not available"):
        _placed_child([f"placement.evaluator_cpus={max(cpus) + 1000}"], "evaluator", 0, 1)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")
def test_cpu_seconds_adds_a_helper_process_and_skips_a_gone_one():
    """A child burns ~0.5 s of CPU and then sleeps: counting it adds about that (more than the
    wall time it slept), and a process id that does not exist adds nothing."""
    import time

    from common.placement import cpu_seconds

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\nprint('done', flush=True)\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        own = time.process_time()
        both = cpu_seconds([child.pid])
        assert 0.45 <= both - own <= 2.0, both - own  # the child's 0.5 s (+ its start-up)
        gone = 2**22 + 1  # above Linux's largest pid_max: no such process
        assert cpu_seconds([gone]) - time.process_time() == pytest.approx(0.0, abs=0.05)
    finally:
        child.kill()
        child.wait()
