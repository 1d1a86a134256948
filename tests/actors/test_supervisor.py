"""actors/supervisor.py with real child processes (small Python scripts stand in for actors):
crashed slots are restarted with a doubling back-off, a slot that exits 0 is done, SIGKILL
counts as a crash, and ``stop()`` leaves no process of any slot's group alive (grandchildren
included)."""

import os
import sys
import time

from actors.supervisor import Supervisor
from common.config import PrimeRunConfig

CRASH_TWICE = """
import pathlib, sys
p = pathlib.Path(sys.argv[1]); n = int(p.read_text()) if p.exists() else 0
p.write_text(str(n + 1)); sys.exit(3 if n < 2 else 0)
"""
FOREVER_WITH_CHILD = """
import os, subprocess, sys, time, pathlib
c = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
p = pathlib.Path(sys.argv[1]); tmp = p.with_suffix(".tmp")
tmp.write_text(f"{os.getpid()} {c.pid}"); tmp.replace(p); time.sleep(600)
"""


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_pids(sup, path, leader_pid, t_end):
    """Poll the supervisor until ``path`` names ``leader_pid`` (the script writes "leader child");
    returns the child pid. Bounded: a test that cannot see it fails instead of hanging CI."""
    while True:
        sup.poll()
        if path.exists():
            leader, child = map(int, path.read_text().split())
            if leader == leader_pid():
                return child
        assert time.monotonic() < t_end, f"no pids from the actor in {path}"
        time.sleep(0.05)


def test_restart_with_backoff_done_on_zero_and_stop_kills_groups(tmp_path):
    cfg = PrimeRunConfig(run={"output_dir": str(tmp_path)},
                         actors={"num": 2, "restart_backoff_s": 0.2, "restart_backoff_max_s": 0.3, "max_restarts": 5})
    (tmp_path / "a.py").write_text(CRASH_TWICE)
    (tmp_path / "b.py").write_text(FOREVER_WITH_CHILD)
    cmds = {0: [sys.executable, str(tmp_path / "a.py"), str(tmp_path / "count")],
            1: [sys.executable, str(tmp_path / "b.py"), str(tmp_path / "child")]}
    sup = Supervisor(cfg, "unused.yaml", log_dir=tmp_path / "logs", command=lambda i: cmds[i]).start()
    try:
        t0 = time.monotonic()
        while not sup.slots[0].done and time.monotonic() - t0 < 30:
            sup.poll()
            time.sleep(0.05)
        assert sup.slots[0].done and (tmp_path / "count").read_text() == "3"
        assert sup.slots[0].restarts == 2 and time.monotonic() - t0 >= 0.2 + 0.3  # back-off 0.2 s, then capped 0.3 s
        # SIGKILL of a running actor: restarted as a new process
        first = sup.slots[1].proc.pid
        first_child = wait_pids(sup, tmp_path / "child", lambda: first, t0 + 60)
        os.kill(first, 9)
        while (sup.slots[1].proc is None or sup.slots[1].proc.pid == first) and time.monotonic() - t0 < 30:
            sup.poll()
            time.sleep(0.05)
        assert sup.slots[1].restarts == 1 and sup.slots[1].proc.pid != first
        assert not alive(first_child)  # the crashed actor's group was killed with it
        leader = sup.slots[1].proc.pid
        grandchild = wait_pids(sup, tmp_path / "child", lambda: leader, time.monotonic() + 60)
        assert alive(leader) and alive(grandchild)
    finally:
        sup.stop(grace_s=5)
    t1 = time.monotonic()  # SIGKILL went to the group; the kernel takes them down asynchronously
    while (alive(leader) or alive(grandchild)) and time.monotonic() - t1 < 10:
        time.sleep(0.05)
    assert not alive(leader) and not alive(grandchild)
    assert sup.restarts() == 3 and (tmp_path / "logs" / "actor-1.log").exists()


def test_gives_up_after_max_restarts(tmp_path):
    cfg = PrimeRunConfig(run={"output_dir": str(tmp_path)},
                         actors={"num": 1, "restart_backoff_s": 0.0, "max_restarts": 2})
    sup = Supervisor(cfg, "unused.yaml", log_dir=tmp_path / "logs",
                     command=lambda i: [sys.executable, "-c", "raise SystemExit(1)"]).start()
    t0 = time.monotonic()
    while sup.poll() and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    sup.stop()
    assert sup.slots[0].given_up and sup.slots[0].restarts == 2
