"""Ablation sweeps: a sweep file names cells (dotted overrides on a base config) and seeds;
each (cell, seed) is one run of the normal launcher (``launch/run.py``), one after another.

Sweep file (YAML)::

    name: prime-vs-rloo                # optional; the folder's name otherwise
    base: configs/tiny.yaml            # relative to the repository root (or absolute)
    seeds: [0, 1, 2]                   # --seeds overrides
    steps: 60                          # --steps overrides; null = the base config's run.steps
    overrides: ["eval.every=10"]       # every cell
    target:                            # optional: "steps to a target training reward"
      metric: reward/outcome_mean      # per-step training metric (smoothed over `window` steps)
      window: 5
      from_cell: rloo                  # the target = that cell's final value (mean over seeds)
      # or value: 0.8                  # a fixed target
    cells:
      prime: ["prime.use_process_rewards=true"]
      rloo: ["prime.use_process_rewards=false"]

In overrides, ``{output}`` is the sweep's output folder and ``{seed}`` the run's seed, so a
cell may use what an earlier cell's run of the same seed left, e.g.
``model.prm_path={output}/runs/online/seed{seed}/final_prm`` (cells run in file order).

Contract: run ``(cell, seed)`` lives in ``<output>/runs/<cell>/seed<seed>`` and is finished
when its ``summary.json`` says it reached the requested steps; finished runs are skipped, so
an interrupted sweep resumes where it stopped. A failed run is reported and the sweep goes
on (its log is ``<run dir>/sweep.log``). ``sweep.json`` in the output folder records the
resolved sweep. The report (``common.sweep_report``) is rebuilt from finished runs only.

Not covered: running cells in parallel on one machine (they would share 2 cores and the
transport ports); on a cluster ``--emit-slurm`` writes one array task per run.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


class SweepError(ValueError):
    """A sweep file that cannot be run; the message names the field."""


@dataclass
class Target:
    metric: str = "reward/outcome_mean"
    window: int = 5
    from_cell: str | None = None
    value: float | None = None


@dataclass
class Sweep:
    name: str
    base: str
    seeds: list[int]
    steps: int | None
    cells: dict[str, list[str]]
    overrides: list[str] = field(default_factory=list)
    target: Target | None = None

    def runs(self) -> list[tuple[str, int]]:
        return [(cell, seed) for cell in self.cells for seed in self.seeds]


def load_sweep(path: str | Path, seeds: list[int] | None = None, steps: int | None = None,
               only: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file; ``seeds``/``steps`` override the file's, ``only``
    keeps only those cells (and the target's reference cell)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"{path}: {e}") from e
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping (name, base, seeds, steps, overrides, target, cells)")
    unknown = set(raw) - {"name", "base", "seeds", "steps", "overrides", "target", "cells"}
    if unknown:
        raise SweepError(f"{path}: unknown field(s) {sorted(unknown)}")
    cells = raw.get("cells")
    if not isinstance(cells, dict) or not cells:
        raise SweepError(f"{path}: cells: a non-empty mapping of cell name -> list of dotted overrides")
    for name, ovs in cells.items():
        if not isinstance(name, str) or not name.replace("-", "_").replace(".", "_").isidentifier():
            raise SweepError(f"{path}: cells: {name!r} is not a usable name (letters, digits, -, _, .)")
        if not isinstance(ovs, list) or not all(isinstance(o, str) and "=" in o for o in ovs):
            raise SweepError(f"{path}: cells.{name}: a list of key=value overrides")
    seeds = seeds if seeds is not None else raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SweepError(f"{path}: seeds: a non-empty list of non-negative integers")
    steps = steps if steps is not None else raw.get("steps")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise SweepError(f"{path}: steps: a positive integer or null")
    base = raw.get("base", "configs/tiny.yaml")
    if not (ROOT / base).is_file() and not Path(base).is_file():
        raise SweepError(f"{path}: base: no config file {base}")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise SweepError(f"{path}: overrides: a list of key=value overrides")
    target = None
    if raw.get("target") is not None:
        t = raw["target"]
        if not isinstance(t, dict) or set(t) - {"metric", "window", "from_cell", "value"}:
            raise SweepError(f"{path}: target: a mapping of metric, window, from_cell | value")
        target = Target(**t)
        if (target.from_cell is None) == (target.value is None):
            raise SweepError(f"{path}: target: give exactly one of from_cell and value")
        if target.from_cell is not None and target.from_cell not in cells:
            raise SweepError(f"{path}: target.from_cell: {target.from_cell!r} is not a cell")
    if only is not None:
        missing = [c for c in only if c not in cells]
        if missing:
            raise SweepError(f"--cells: no cell(s) {missing} in {path} (cells: {list(cells)})")
        keep = set(only) | ({target.from_cell} if target is not None and target.from_cell else set())
        cells = {k: v for k, v in cells.items() if k in keep}
    sweep = Sweep(raw.get("name") or path.stem, base, list(seeds), steps, {k: list(v) for k, v in cells.items()},
                  list(overrides), target)
    _check_overrides(sweep)
    return sweep


def _check_overrides(sweep: Sweep) -> None:
    """Every cell's overrides must make a valid config (a typo fails now, not after hours)."""
    from common.config import ConfigError, load_config

    base = str(ROOT / sweep.base) if (ROOT / sweep.base).is_file() else sweep.base
    for cell, ovs in sweep.cells.items():
        try:
            load_config(base, fill([*sweep.overrides, *ovs], Path("OUTPUT"), 0))
        except ConfigError as e:
            raise SweepError(f"cells.{cell}: {e}") from e


# ------------------------------------------------------------------------------- runs


def fill(overrides: list[str], output: Path, seed: int) -> list[str]:
    """``{output}`` and ``{seed}`` in overrides replaced by the sweep's output folder and the seed."""
    return [o.replace("{output}", str(output)).replace("{seed}", str(seed)) for o in overrides]


def run_dir(output: Path, cell: str, seed: int) -> Path:
    return output / "runs" / cell / f"seed{seed}"


def run_command(sweep: Sweep, cell: str, seed: int, output: Path, python: str | None = None) -> list[str]:
    """The launcher command of one run (the same on this machine and in a SLURM task)."""
    cmd = [python or sys.executable, str(ROOT / "launch" / "run.py"), "--config", sweep.base,
           "--output-dir", str(run_dir(output, cell, seed))]
    if sweep.steps is not None:
        cmd += ["--steps", str(sweep.steps)]
    return cmd + fill([*sweep.overrides, *sweep.cells[cell]], output, seed) + [f"run.seed={seed}"]


def finished(output: Path, cell: str, seed: int, steps: int | None) -> bool:
    s = _read_json(run_dir(output, cell, seed) / "summary.json")
    if not s or s.get("last_step") is None:
        return False
    return steps is None or int(s["last_step"]) >= steps


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_sweep(sweep: Sweep, output: str | Path, log=print) -> dict:
    """Run every unfinished (cell, seed) in turn, then write the report. Returns the summary."""
    from common.sweep_report import write_report

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "sweep.json").write_text(json.dumps(asdict(sweep), indent=1))
    runs = sweep.runs()
    todo = [(c, s) for c, s in runs if not finished(output, c, s, sweep.steps)]
    log(f"sweep {sweep.name}: {len(sweep.cells)} cells x {len(sweep.seeds)} seeds = {len(runs)} runs; "
        f"{len(runs) - len(todo)} already finished, {len(todo)} to run; output {output}")
    durations: list[float] = []
    failed: list[str] = []
    for i, (cell, seed) in enumerate(todo):
        eta = ""
        if durations:
            left = sum(durations) / len(durations) * (len(todo) - i)
            eta = f", ETA {left / 60:.0f} min"
        log(f"[{len(runs) - len(todo) + i + 1}/{len(runs)}] {cell} seed {seed}{eta}")
        rd = run_dir(output, cell, seed)
        rd.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(rd / "sweep.log", "wb") as out:
            rc = subprocess.call(run_command(sweep, cell, seed, output), cwd=str(ROOT), stdout=out,
                                 stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        durations.append(time.time() - t0)
        if rc != 0 or not finished(output, cell, seed, sweep.steps):
            failed.append(f"{cell}/seed{seed}")
            log(f"    FAILED (exit {rc}); log: {rd / 'sweep.log'}")
        else:
            line = _last_line(rd / "sweep.log", "held-out accuracy")
            log(f"    {line or 'done'} [{durations[-1]:.0f} s]")
    summary = write_report(sweep, output)
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)} (run the same command again to retry them)")
    return summary


def _last_line(path: Path, startswith: str) -> str | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    hits = [ln.strip() for ln in lines if ln.strip().startswith(startswith)]
    return hits[-1] if hits else None


def emit_slurm(sweep: Sweep, output: str | Path, path: str | Path, sweep_file: str) -> Path:
    """A SLURM array script with one task per (cell, seed); run from the repository root.
    Each task runs the same launcher command as the local sweep; afterwards
    ``launch/sweep.py SWEEP --report OUTPUT`` builds the report."""
    output = Path(output)
    runs = sweep.runs()
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{sweep.name}", f"#SBATCH --array=0-{len(runs) - 1}",
             "#SBATCH --nodes=1 --ntasks=1", "#SBATCH --output=" + str(output / "slurm-%A_%a.out"),
             f"# {len(runs)} runs of {sweep_file}: submit from the repository root; then",
             f"#   .venv/bin/python launch/sweep.py {sweep_file} --report {output}",
             "set -euo pipefail", 'case "$SLURM_ARRAY_TASK_ID" in']
    for i, (cell, seed) in enumerate(runs):
        cmd = run_command(sweep, cell, seed, output, python=".venv/bin/python")
        cmd[1] = "launch/run.py"
        lines.append(f"  {i}) exec {' '.join(shlex.quote(c) for c in cmd) } ;;")
    lines += ['  *) echo "no run for task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    path.chmod(0o755)
    return path
