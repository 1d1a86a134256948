"""Staleness ablation: the same PRIME run at several staleness bounds η, one after another.

    .venv/bin/python benchmarks/staleness.py [--eta 0,1,2] [--admission capacity,version]
        [--steps 40] [--rounds 1] [--config configs/tiny.yaml] [--output-dir runs/staleness]
        [--no-eval] [key=value ...]

Each run is ``launch.local.run_local`` (real learner under torchrun, real actors, the
evaluator unless ``--no-eval``) with ``async.max_staleness=η`` and the same seed, steps and
overrides; η = 0 is synchronous (an actor starts a group only with the learner's newest
weights). ``--admission`` also varies ``async.admission`` (capacity = the version rule plus
the capacity rule, the default; version = the version rule alone), one row per (mode, η).
Runs are interleaved round by round (η order alternates every round) so slow
drifts of a shared machine's load fall on every η alike. Per run, from its
``metrics.jsonl``/``eval.jsonl``: steady-state seconds per learner step (the learner's clock,
first ``--skip`` steps left out: start-up), the learner's wait-for-data share, version lag
(mean of the per-step mean, and the max), groups dropped as over-stale, the actors' tokens/s,
and held-out accuracy (start -> mean of the last evaluations, sampled). Figures are medians
over rounds. The last line reads ``speedup of η=A over η=0: ratio R`` with R = seconds per
step at η=0 / at η=A (A = the largest η asked for; with no η=0 in the list, against the
smallest), for the first admission mode listed. On the default tiny task each run takes about 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_figures(metrics: list[dict], evals: list[dict], skip: int, last_n: int) -> dict:
    """Figures of one run from its per-step metrics rows (``time`` = seconds since the learner
    started) and its evaluations. Steady state = the steps after the first ``skip``."""
    if len(metrics) < skip + 2:
        raise ValueError(f"{len(metrics)} steps logged: need more than --skip {skip} + 1")
    steady = metrics[skip:]
    span = steady[-1]["time"] - steady[0]["time"]
    out = {
        "steps": len(metrics),
        "s_per_step": span / (len(steady) - 1),
        "wait_data_share": sum(m.get("time/wait_data_s", 0.0) for m in steady[1:]) / span if span > 0 else 0.0,
        "lag_mean": statistics.fmean(m.get("system/version_lag_mean", 0.0) for m in steady),
        "lag_max": max(m.get("system/version_lag_max", 0.0) for m in metrics),
        "groups_stale": metrics[-1].get("system/groups_stale", 0.0),
        "groups_received": metrics[-1].get("system/groups_received", 0.0),
        "actor_tokens_per_s": statistics.median(m.get("actor/tokens_per_s", 0.0) for m in steady),
    }
    # CPU seconds per step: the learner's own (rank 0), the actors' with their verifier workers
    if all("system/cpu_s" in m for m in steady[1:]):
        out["learner_cpu_per_step"] = sum(m["system/cpu_s"] for m in steady[1:]) / (len(steady) - 1)
    if "actor/cpu_s" in steady[0] and "actor/cpu_s" in steady[-1]:
        out["actor_cpu_per_step"] = (steady[-1]["actor/cpu_s"] - steady[0]["actor/cpu_s"]) / (len(steady) - 1)
    if evals:
        tail = evals[-last_n:]
        out["acc_start"] = evals[0]["accuracy"]
        out["acc_end"] = statistics.fmean(e["accuracy"] for e in tail)
    return out


def measure_run(config: str, overrides: list[str], run_dir: Path, steps: int, skip: int,
                with_eval: bool = True) -> dict:
    """One real run (``launch.local.run_local``) of ``config`` with ``overrides``, ``steps``
    learner steps, in ``run_dir`` (the evaluator off unless ``with_eval``); its ``run_figures``."""
    from common.config import load_config
    from launch.local import run_local

    ov = [*overrides, f"run.steps={steps}", f"run.output_dir={run_dir}"] + ([] if with_eval else ["eval.every=0"])
    cfg = load_config(config, ov)
    run_local(cfg, live=False)
    return run_figures(read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl"), skip,
                       cfg.eval.last_n)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eta", default="0,1,2", help="comma-separated staleness bounds [policy versions]")
    ap.add_argument("--admission", default="capacity", help="comma-separated async.admission modes [enum]")
    ap.add_argument("--steps", type=int, default=40, help="learner steps per run [steps]")
    ap.add_argument("--rounds", type=int, default=1, help="runs per η, interleaved [runs]")
    ap.add_argument("--skip", type=int, default=3, help="start-up steps left out of the timing [steps]")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--output-dir", default="runs/staleness", help="one sub-directory per run [path]")
    ap.add_argument("--no-eval", action="store_true", help="no evaluator process (timing only)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = ap.parse_args(argv)
    etas = sorted({int(x) for x in args.eta.split(",")})
    if len(etas) < 2:
        ap.error("--eta needs at least two values to compare")
    modes = list(dict.fromkeys(m.strip() for m in args.admission.split(",")))
    if any(m not in ("capacity", "version") for m in modes):
        ap.error("--admission takes capacity and/or version")
    cases = [(m, e) for m in modes for e in etas]

    from rich.console import Console
    from rich.table import Table

    console = Console()
    per_case: dict[tuple[str, int], list[dict]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for mode, eta in (cases if r % 2 == 0 else cases[::-1]):
            run_dir = Path(args.output_dir) / f"{mode}-eta{eta}-r{r}"
            console.print(f"[bold]round {r + 1}/{args.rounds}, {mode}, η={eta}[/bold] -> {run_dir}")
            fig = measure_run(args.config, [*args.overrides, f"async.max_staleness={eta}", f"async.admission={mode}"],
                              run_dir, args.steps, args.skip, with_eval=not args.no_eval)
            per_case[(mode, eta)].append(fig)
            console.print(f"{mode}, η={eta}: {fig['s_per_step']:.2f} s/step, lag mean {fig['lag_mean']:.2f}"
                          f" max {fig['lag_max']:.0f}, stale groups {fig['groups_stale']:.0f}")

    med = {c: {k: statistics.median(f[k] for f in figs) for k in figs[0]} for c, figs in per_case.items()}
    t = Table(title=f"staleness ablation: {args.steps} steps, median of {args.rounds} round(s)")
    for c in ("admission", "η", "s/step", "wait", "lag mean", "lag max", "stale/received", "actor tok/s",
              "held-out"):
        t.add_column(c, justify="right", no_wrap=True)
    for (mode, e), f in med.items():
        acc = f"{100 * f['acc_start']:.1f}% -> {100 * f['acc_end']:.1f}%" if "acc_end" in f else "-"
        t.add_row(mode, str(e), f"{f['s_per_step']:.2f}", f"{100 * f['wait_data_share']:.0f}%", f"{f['lag_mean']:.2f}",
                  f"{f['lag_max']:.0f}", f"{f['groups_stale']:.0f}/{f['groups_received']:.0f}",
                  f"{f['actor_tokens_per_s']:.0f}", acc)
    Console(width=max(console.width, 120)).print(t)
    base, top = etas[0], etas[-1]
    ratio = med[(modes[0], base)]["s_per_step"] / med[(modes[0], top)]["s_per_step"]
    out = {"etas": etas, "admission": modes, "steps": args.steps, "rounds": args.rounds, "ratio": ratio,
           "median": {f"{m}/eta{e}": f for (m, e), f in med.items()},
           "runs": {f"{m}/eta{e}": f for (m, e), f in per_case.items()}}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "staleness.json").write_text(json.dumps(out, indent=2))
    print(f"speedup of η={top} over η={base} ({modes[0]} admission): ratio {ratio:.2f}", flush=True)
    return out


if __name__ == "__main__":
    main()
