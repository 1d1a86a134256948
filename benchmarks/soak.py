"""Soak test: a long PRIME run with every process's resident memory sampled.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--interval 5] [--warmup-frac 0.2]
        [--config configs/tiny.yaml] [--output-dir runs/soak] [key=value ...]

Starts ``launch/run.py`` (learner under torchrun, actor, verifier workers, evaluator) with
more steps than it can finish, samples the RSS of every process whose command line names the
run directory (and their children: the verifier workers) every ``--interval`` seconds from
``/proc``, and stops the run with SIGINT (the launcher's Ctrl-C path) after ``--minutes``.
Processes are grouped by role (launcher, torchrun agent, learner, actor, verifier, evaluator,
other); per role it reports the summed RSS at the end of warm-up (the first ``--warmup-frac``
of the time), at the end, the growth between them and the slope of a least-squares line
through the post-warm-up samples (MiB per hour). The goal is flat: a slope near 0. Writes
``<output-dir>/soak.json`` (every sample) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _rss_mib(pid: int) -> float | None:
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in (Path("/proc") / str(pid) / "task").iterdir():
            kids = (task / "children").read_text().split()
            out += [int(k) for k in kids]
    except OSError:
        pass
    return out


def role(cmd: str) -> str:
    if "torch.distributed.run" in cmd:
        return "torchrun agent"
    if "launch/learner.py" in cmd or "launch.learner" in cmd:  # as a file, or re-run as a module
        return "learner"
    if "--evaluator" in cmd:
        return "evaluator"
    if "--slot" in cmd:
        return "actor"
    if "launch/run.py" in cmd or "launch.run" in cmd:
        return "launcher"
    if "multiprocessing" in cmd or "spawn_main" in cmd:
        return "verifier"
    return "other"


def sample(root_pid: int) -> dict[str, float]:
    """Summed RSS (MiB) per role over the launcher's process tree."""
    seen, stack, per = set(), [root_pid], defaultdict(float)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        rss = _rss_mib(pid)
        if rss is not None:
            per[role(_cmdline(pid))] += rss
        stack += _children(pid)
    return dict(per)


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against ts (seconds), in units per hour."""
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 3600.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--warmup-frac", type=float, default=0.2, help="share of the time counted as warm-up")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--output-dir", default=str(ROOT / "runs" / "soak"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "--config", args.config, "--steps", "1000000",
           "--output-dir", str(out_dir / "run"), "checkpoint.every=200", *args.overrides]
    with open(out_dir / "launcher.log", "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)
    t0 = time.monotonic()
    samples = []
    try:
        while time.monotonic() - t0 < args.minutes * 60 and p.poll() is None:
            samples.append({"t": round(time.monotonic() - t0, 1), "rss_mib": sample(p.pid)})
            time.sleep(args.interval)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGINT)
            try:
                p.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    if p.returncode not in (None, 0, 1) and time.monotonic() - t0 < args.minutes * 60:
        print(f"the run ended early (exit {p.returncode}); see {out_dir / 'launcher.log'}", file=sys.stderr)
    warm_t = args.minutes * 60 * args.warmup_frac
    roles = sorted({r for s in samples for r in s["rss_mib"]})
    rows = []
    for r in roles:
        pts = [(s["t"], s["rss_mib"].get(r, 0.0)) for s in samples if s["t"] >= warm_t]
        if not pts:
            continue
        ts, ys = [t for t, _ in pts], [y for _, y in pts]
        rows.append({"role": r, "after_warmup_mib": round(ys[0], 1), "end_mib": round(ys[-1], 1),
                     "growth_mib": round(ys[-1] - ys[0], 1), "slope_mib_per_h": round(slope_per_hour(ts, ys), 1)})
    metrics = out_dir / "run" / "metrics.jsonl"
    steps = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    (out_dir / "soak.json").write_text(json.dumps({"minutes": args.minutes, "interval_s": args.interval,
                                                   "steps": steps, "roles": rows, "samples": samples}, indent=1))
    print(f"soak: {args.minutes:.0f} min, {steps} learner steps, {len(samples)} samples; RSS summed per role, "
          f"after the first {100 * args.warmup_frac:.0f}% of the time")
    print("| role | after warm-up, MiB | end, MiB | growth, MiB | slope, MiB/h |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['role']} | {row['after_warmup_mib']} | {row['end_mib']} | {row['growth_mib']} | "
              f"{row['slope_mib_per_h']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
