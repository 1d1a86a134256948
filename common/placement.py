"""Where each process runs: CPU affinity, torch threads and priority, per role.

Contract: every process of a run (a learner rank, an actor, the evaluator) calls ``apply``
once at start with its role and its index among the processes of that role on this host; it
then runs on the CPUs ``placement.<role>_cpus`` gives it (``os.sched_setaffinity``), with the
configured number of torch intra-op threads and niceness. A role's CPU list is split into
equal contiguous shares, one per process of that role on the host (learner: local ranks;
actors: ``actors.num``); with fewer CPUs than processes the processes share round-robin.
An empty list leaves the process where the OS puts it. GPUs are placed elsewhere
(``actors.gpus``, ``actors.learner_gpus``).

Invariants: a CPU list names only CPUs this process may run on (else ``PlacementError``
before any work starts); ``apply`` is idempotent. Not covered: NUMA memory binding, cgroups,
other hosts' CPU numbering (each host reads its own config).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

ROLES = ("learner", "actor", "evaluator")


class PlacementError(ValueError):
    pass


def parse_cpus(spec: str | None) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6] (sorted, no duplicates); '' or None -> []."""
    out: set[int] = set()
    for part in (spec or "").replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise PlacementError(f"CPU list {spec!r}: {part!r} is not N or N-M") from None
        if a < 0 or b < a:
            raise PlacementError(f"CPU list {spec!r}: {part!r} is not an increasing range of CPU ids")
        out.update(range(a, b + 1))
    return sorted(out)


def share(cpus: list[int], index: int, count: int) -> list[int]:
    """Process ``index`` of ``count``'s share of ``cpus``: equal contiguous slices (the first
    ``len % count`` get one more); with fewer CPUs than processes, CPU ``index mod len``."""
    if not cpus:
        return []
    if not 0 <= index < count:
        raise PlacementError(f"process {index} of {count}")
    if len(cpus) < count:
        return [cpus[index % len(cpus)]]
    q, r = divmod(len(cpus), count)
    start = index * q + min(index, r)
    return cpus[start : start + q + (1 if index < r else 0)]


def plan(pcfg, role: str, index: int = 0, count: int = 1) -> dict:
    """What ``apply`` would do for ``role``'s process ``index`` of ``count``: ``cpus`` (a list,
    [] = unchanged), ``threads`` (None = unchanged), ``nice`` (0 = unchanged)."""
    if role not in ROLES:
        raise PlacementError(f"role {role!r} not in {ROLES}")
    cpus = share(parse_cpus(getattr(pcfg, f"{role}_cpus")), index, count)
    threads = getattr(pcfg, f"{role}_threads")
    if threads is None and cpus:
        threads = len(cpus)  # one intra-op thread per CPU the process owns
    return {"cpus": cpus, "threads": threads, "nice": getattr(pcfg, f"{role}_nice")}


def apply(pcfg, role: str, index: int = 0, count: int = 1) -> dict:
    """Place this process (see the module docstring); returns the plan it applied plus the
    CPU set it ended with (``allowed``)."""
    p = plan(pcfg, role, index, count)
    if p["cpus"]:
        allowed = os.sched_getaffinity(0)
        missing = sorted(set(p["cpus"]) - allowed)
        if missing:
            raise PlacementError(f"placement.{role}_cpus: CPUs {missing} are not available to this process "
                                 f"(it may run on {sorted(allowed)})")
        os.sched_setaffinity(0, p["cpus"])
    if p["threads"] is not None:
        import torch

        torch.set_num_threads(int(p["threads"]))
    if p["nice"]:
        current = os.nice(0)
        if current < p["nice"]:
            os.nice(p["nice"] - current)
    p["allowed"] = sorted(os.sched_getaffinity(0))
    log.info("placement: %s %d/%d on CPUs %s, %s torch threads, nice %d", role, index, count,
             p["allowed"], p["threads"] if p["threads"] is not None else "default", os.nice(0))
    return p


def cpu_seconds(pids=()) -> float:
    """CPU seconds (user + system, every thread) this process has used, plus those of the
    processes ``pids`` (its helpers, e.g. verifier workers; read from /proc/<pid>/stat, so
    Linux only; an unreadable one, e.g. gone, adds nothing). For utilisation figures."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:  # fields after the command's closing parenthesis: state is field 3; utime 14, stime 15
            fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return total


__all__ = ["PlacementError", "apply", "cpu_seconds", "parse_cpus", "plan", "share"]
