"""The report of a sweep (``common.sweep``), built from its finished runs only: per cell, per
seed and as mean ± 95% confidence interval (Student t over seeds), of

- ``final_heldout_accuracy``: the run's summary (mean of its last evaluations);
- ``final_train_reward``: the training reward (``target.metric``, default
  ``reward/outcome_mean``) averaged over the last ``target.window`` steps;
- ``steps_to_target``: the first step at which that metric, averaged over ``window`` steps,
  reaches the target (a fixed value, or another cell's mean final training reward, as the
  paper measures sample efficiency); runs that never reach it are counted, not averaged;
- ``seconds_per_step`` (steady-state wall time between logged steps, evaluation pauses
  included), ``version_lag_mean`` (realised lag of the
  trained tokens), ``prm_accuracy`` (last ``window`` steps), ``mismatch_kl`` (mean over steps);

and, paired on seed against the reference cell (the target's ``from_cell``, else the first
cell), the per-seed differences of the final held-out accuracy and training reward with their
mean ± 95% CI: the seeds share the warm-up model and the prompts, so the paired interval is
the one that says whether two cells differ beyond seed noise.

Writes ``summary.json``, ``summary.md`` (the table) and ``curves_step.png`` /
``curves_time.png`` (mean over seeds with a min–max band, against learner step and against
wall time) into the sweep's output folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from common.jsonl import read_rows as _jsonl

# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (beyond: 1.96)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]

PAIRED = ("final_heldout_accuracy", "final_train_reward")
FIGURES = ("final_heldout_accuracy", "final_train_reward", "steps_to_target", "seconds_per_step",
           "version_lag_mean", "prm_accuracy", "mismatch_kl")


def mean_ci95(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of the 95% CI of the mean); half-width None for fewer than 2 values."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    t = _T975[len(values) - 2] if len(values) - 1 <= len(_T975) else 1.96
    return m, t * sd / math.sqrt(len(values))


def _smoothed(rows: list[dict], key: str, window: int) -> list[tuple[int, float]]:
    """(step, mean of ``key`` over the last ``window`` steps up to it)."""
    pts = [(int(r["step"]), float(r[key])) for r in rows if key in r and r[key] is not None]
    out = []
    for i, (step, _) in enumerate(pts):
        win = pts[max(0, i - window + 1):i + 1]
        out.append((step, sum(v for _, v in win) / len(win)))
    return out


def _mean_key(rows: list[dict], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def run_figures(run: Path, rows: list[dict], metric: str, window: int) -> dict:
    """The figures of one finished run, ``rows`` its metrics.jsonl (without steps_to_target,
    which needs the target)."""
    summary = json.loads((run / "summary.json").read_text())
    smooth = _smoothed(rows, metric, window)
    return {
        "final_heldout_accuracy": summary.get("end_accuracy"),
        "final_train_reward": smooth[-1][1] if smooth else None,
        "seconds_per_step": _seconds_per_step(rows),
        "version_lag_mean": _mean_key(rows, "system/version_lag_mean"),
        "prm_accuracy": _mean_key(rows[-window:], "prm/accuracy"),
        "mismatch_kl": _mean_key(rows, "loss/mismatch_kl"),
    }


def _seconds_per_step(rows: list[dict]) -> float | None:
    """Steady-state wall seconds per learner step: from the first logged step to the last
    (start-up and the first step's wait for data excluded; evaluation pauses included)."""
    t = [float(r["time"]) for r in rows if "time" in r]
    return (t[-1] - t[0]) / (len(t) - 1) if len(t) >= 2 else None


def steps_to(rows: list[dict], metric: str, window: int, target: float) -> int | None:
    for step, v in _smoothed(rows, metric, window):
        if v >= target - 1e-12:
            return step
    return None


def collect(sweep, output: Path) -> dict:
    """Per cell and seed, the figures of every finished run; the target; stats per cell."""
    from common.sweep import finished, run_dir

    t = sweep.target
    metric, window = (t.metric, t.window) if t else ("reward/outcome_mean", 5)
    per: dict[str, dict[int, dict]] = {}
    rows: dict[tuple[str, int], list[dict]] = {}  # each run's metrics.jsonl, read once
    for cell, seed in sweep.runs():
        if finished(output, cell, seed, sweep.steps):
            rd = run_dir(output, cell, seed)
            rows[cell, seed] = _jsonl(rd / "metrics.jsonl")
            per.setdefault(cell, {})[seed] = run_figures(rd, rows[cell, seed], metric, window)
    target = None
    if t is not None:
        if t.value is not None:
            target = float(t.value)
        else:
            finals = [f["final_train_reward"] for f in per.get(t.from_cell, {}).values()
                      if f["final_train_reward"] is not None]
            target = sum(finals) / len(finals) if finals else None
    cells = {}
    for cell in sweep.cells:
        runs = per.get(cell, {})
        if target is not None:
            for seed, f in runs.items():
                f["steps_to_target"] = steps_to(rows[cell, seed], metric, window, target)
        stats = {}
        for fig in FIGURES:
            vals = {seed: f.get(fig) for seed, f in runs.items()}
            got = [v for v in vals.values() if v is not None]
            m, ci = mean_ci95(got)
            stats[fig] = {"per_seed": vals, "mean": m, "ci95": ci, "n": len(got)}
        cells[cell] = {"runs": len(runs), "seeds": sorted(runs), "overrides": sweep.cells[cell], "figures": stats}
    ref = t.from_cell if t and t.from_cell else next(iter(sweep.cells))
    return {"sweep": sweep.name, "steps": sweep.steps, "seeds": sweep.seeds, "base": sweep.base,
            "overrides": sweep.overrides, "target": {"metric": metric, "window": window, "value": target,
                                                     "from_cell": t.from_cell if t else None}, "cells": cells,
            "paired": {"reference": ref, "cells": paired_differences(per, ref)}}


def paired_differences(per: dict[str, dict[int, dict]], ref: str) -> dict[str, dict]:
    """Per cell other than ``ref``: for each figure in PAIRED, the per-seed difference
    cell − ref over the seeds both finished, and its mean ± 95% CI."""
    out = {}
    base = per.get(ref, {})
    for cell, runs in per.items():
        if cell == ref:
            continue
        figs = {}
        for fig in PAIRED:
            diffs = {seed: f[fig] - base[seed][fig] for seed, f in sorted(runs.items())
                     if seed in base and f.get(fig) is not None and base[seed].get(fig) is not None}
            m, ci = mean_ci95(list(diffs.values()))
            figs[fig] = {"per_seed": diffs, "mean": m, "ci95": ci, "n": len(diffs)}
        out[cell] = figs
    return out


def _fmt(stat: dict, digits: int) -> str:
    if stat["mean"] is None:
        return "–"
    s = f"{stat['mean']:.{digits}f}"
    if stat["ci95"] is not None:
        s += f" ± {stat['ci95']:.{digits}f}"
    return s


def markdown(summary: dict) -> str:
    t = summary["target"]
    head = ["cell", "runs", "final held-out acc", "final train reward", "steps to target", "s/step", "lag",
            "PRM acc", "mismatch KL"]
    digits = [3, 3, 1, 2, 2, 3, 5]
    lines = [f"Sweep `{summary['sweep']}`: {summary['steps']} steps, seeds {summary['seeds']}; mean ± 95% CI "
             f"over seeds (Student t).",
             f"Target: {t['metric']} (mean over {t['window']} steps) ≥ "
             + (f"{t['value']:.3f}" if t["value"] is not None else "–")
             + (f" (cell {t['from_cell']}'s final value)" if t["from_cell"] else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell, c in summary["cells"].items():
        f = c["figures"]
        cols = [cell, str(c["runs"])]
        for fig, d in zip(FIGURES, digits):
            cell_txt = _fmt(f[fig], d)
            if fig == "steps_to_target" and summary["target"]["value"] is not None:
                cell_txt += f" ({f[fig]['n']}/{c['runs']} reached)"
            cols.append(cell_txt)
        lines.append("| " + " | ".join(cols) + " |")
    paired = summary.get("paired") or {}
    if paired.get("cells"):
        lines += ["", f"Paired on seed against `{paired['reference']}` (cell − reference, same seeds); a 95% CI "
                  "that contains 0 means no difference beyond seed noise.", "",
                  "| cell | seeds | Δ final held-out acc | Δ final train reward |", "|---|---|---|---|"]
        for cell, figs in paired["cells"].items():
            a, r = figs["final_heldout_accuracy"], figs["final_train_reward"]
            lines.append(f"| {cell} | {a['n']} | {_fmt(a, 4)} | {_fmt(r, 4)} |")
    return "\n".join(lines) + "\n"


def _curves(sweep, output: Path, x_key: str, path: Path, metric: str) -> Path | None:
    """Mean over seeds with a min-max band, one line per cell, for the training reward, the
    held-out accuracy and the PRM accuracy, against ``x_key`` ('step' or 'time')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from common.sweep import finished, run_dir

    panels = [(metric, "metrics.jsonl", "training reward"), ("accuracy", "eval.jsonl", "held-out accuracy"),
              ("prm/accuracy", "metrics.jsonl", "PRM accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    drew = False
    colours = {cell: f"C{i % 10}" for i, cell in enumerate(sweep.cells)}  # one colour per cell in every panel
    for ax, (key, file, title) in zip(axes, panels):
        for cell in sweep.cells:
            series = []
            for seed in sweep.seeds:
                if not finished(output, cell, seed, sweep.steps):
                    continue
                rd = run_dir(output, cell, seed)
                rows = _jsonl(rd / file)
                # metrics' "time" is seconds since the learner started; an evaluation of version v
                # is placed at the time step v was logged (the policy it scored existed from then)
                at = {0: 0.0, **{int(r["step"]): float(r["time"]) for r in _jsonl(rd / "metrics.jsonl") if "time" in r}}
                step_of = (lambda r: r["step"]) if file == "metrics.jsonl" else (lambda r: r["policy_version"])
                pts = [(step_of(r) if x_key == "step" else at[int(step_of(r))], float(r[key])) for r in rows
                       if r.get(key) is not None and (x_key == "step" or int(step_of(r)) in at)]
                if pts:
                    series.append(np.array(sorted(pts)))
            if not series:
                continue
            lo = max(s[0, 0] for s in series)
            hi = min(s[-1, 0] for s in series)
            grid = np.linspace(lo, hi, 60) if hi > lo else np.array([lo])
            ys = np.stack([np.interp(grid, s[:, 0], s[:, 1]) for s in series])
            ax.plot(grid, ys.mean(0), color=colours[cell], label=f"{cell} (n={len(series)})")
            ax.fill_between(grid, ys.min(0), ys.max(0), color=colours[cell], alpha=0.2)
            drew = True
        ax.set_title(title)
        ax.set_xlabel("learner step" if x_key == "step" else "wall time [s]")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"sweep {sweep.name}: mean over seeds, band = min–max")
    fig.tight_layout()
    if drew:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if drew else None


def write_report(sweep, output: str | Path) -> dict:
    """Build summary.json, summary.md and the PNGs from the finished runs; returns the summary."""
    output = Path(output)
    summary = collect(sweep, output)
    metric = summary["target"]["metric"]
    pngs = [p for p in (_curves(sweep, output, "step", output / "curves_step.png", metric),
                        _curves(sweep, output, "time", output / "curves_time.png", metric)) if p]
    summary["figures"] = [p.name for p in pngs]
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    (output / "summary.md").write_text(markdown(summary))
    return summary
