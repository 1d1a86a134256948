"""Does asynchrony pay? The same run synchronous (η = 0) and asynchronous (η ≥ 1), side by side.

    .venv/bin/python benchmarks/pipeline.py [--eta N] [--steps 40] [--rounds 2] [--skip 3]
        [--config configs/tiny.yaml] [--output-dir runs/pipeline] [--with-eval] [key=value ...]

Each run is ``launch.local.run_local`` (real learner under torchrun, real actors; the
evaluator only with ``--with-eval``) with the same seed, steps and overrides, and
``async.max_staleness`` = 0 or η. Rounds are interleaved (the order flips every round) so a
shared machine's load drifts fall on both alike; figures are medians over rounds.

From the synchronous run, where actor and learner strictly alternate (an actor starts a group
only with the learner's newest weights), per learner step (steady state, first ``--skip``
steps left out):
- Ttrain = seconds the learner computes (step time minus its wait for data),
- Tgen = seconds it waits for data (generation, scoring, transport and weight sync: the
  actor's side of the alternation).
Perfect overlap would make a step take max(Tgen, Ttrain) instead of Tgen + Ttrain, so the
ideal speedup is bound = (Tgen + Ttrain) / max(Tgen, Ttrain). The measured speedup is the
synchronous seconds per step over the asynchronous ones. The last line reads
``ratio R`` with R = speedup / bound (1 = asynchrony delivers all the overlap there is).
The bound assumes each side keeps its own cores; the line before the last also gives the
cores' bound (``overlap_figures``: CPU seconds per step of learner and actor in the synchronous
run over the cores there are), which is the one to read when the learner borrows the actor's
core while it is idle (``placement.prm_thread``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from benchmarks.staleness import measure_run  # noqa: E402


def overlap_figures(sync: dict, asyn: dict, cores: int | None = None) -> dict:
    """Tgen, Ttrain, speedup, bound and ratio from a synchronous and an asynchronous run's
    figures (``run_figures``: ``s_per_step``, ``wait_data_share``, optionally
    ``learner_cpu_per_step`` and ``actor_cpu_per_step``). Seconds per step.

    With ``cores`` and the CPU figures also the cores' bound: an asynchronous step cannot take
    less than the CPU seconds both sides spend per step (as in the synchronous run) spread over
    ``cores``, so t_cores = (learner + actor CPU) / cores, bound_cores = (Tgen + Ttrain) /
    max(Tgen, Ttrain, t_cores) and ratio_cores = speedup / bound_cores. The two bounds agree
    when each side keeps to its own cores; where one side uses, in the synchronous run, the
    cores the other leaves idle (placement.prm_thread), only the second can be reached."""
    t_gen = sync["s_per_step"] * sync["wait_data_share"]
    t_train = sync["s_per_step"] - t_gen
    if t_train <= 0 or t_gen < 0:
        raise ValueError(f"synchronous run has no learner compute time (wait share {sync['wait_data_share']:.2f})")
    speedup = sync["s_per_step"] / asyn["s_per_step"]
    bound = (t_gen + t_train) / max(t_gen, t_train)
    out = {"t_gen": t_gen, "t_train": t_train, "speedup": speedup, "bound": bound, "ratio": speedup / bound}
    if cores and "learner_cpu_per_step" in sync and "actor_cpu_per_step" in sync:
        t_cores = (sync["learner_cpu_per_step"] + sync["actor_cpu_per_step"]) / cores
        bound_cores = (t_gen + t_train) / max(t_gen, t_train, t_cores)
        out.update(t_cores=t_cores, bound_cores=bound_cores, ratio_cores=speedup / bound_cores)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eta", type=int, default=None,
                    help="staleness bound of the asynchronous run; default: the config's async.max_staleness [policy versions]")
    ap.add_argument("--steps", type=int, default=40, help="learner steps per run [steps]")
    ap.add_argument("--rounds", type=int, default=2, help="runs per mode, interleaved [runs]")
    ap.add_argument("--skip", type=int, default=3, help="start-up steps left out of the timing [steps]")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--output-dir", default="runs/pipeline", help="one sub-directory per run [path]")
    ap.add_argument("--with-eval", action="store_true", help="run the evaluator beside (default: off)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = ap.parse_args(argv)
    if args.eta is None:
        from common.config import load_config

        args.eta = load_config(args.config, args.overrides).async_.max_staleness
    if args.eta < 1:
        ap.error("--eta must be >= 1 (η = 0 is the synchronous run it is compared with)")

    runs: dict[int, list[dict]] = {0: [], args.eta: []}
    for r in range(args.rounds):
        for eta in ((0, args.eta) if r % 2 == 0 else (args.eta, 0)):
            run_dir = Path(args.output_dir) / f"eta{eta}-r{r}"
            print(f"round {r + 1}/{args.rounds}, η={eta} -> {run_dir}", flush=True)
            fig = measure_run(args.config, [*args.overrides, f"async.max_staleness={eta}"], run_dir, args.steps,
                              args.skip, with_eval=args.with_eval)
            runs[eta].append(fig)
            print(f"  η={eta}: {fig['s_per_step']:.3f} s/step, waiting for data {100 * fig['wait_data_share']:.0f}%,"
                  f" lag mean {fig['lag_mean']:.2f}", flush=True)

    keys = ("s_per_step", "wait_data_share", "lag_mean", "learner_cpu_per_step", "actor_cpu_per_step")
    med = {e: {k: statistics.median(f[k] for f in figs) for k in keys if all(k in f for f in figs)}
           for e, figs in runs.items()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    fig = overlap_figures(med[0], med[args.eta], cores)
    print(f"synchronous (η=0): {med[0]['s_per_step']:.3f} s/step = Tgen {fig['t_gen']:.3f} + Ttrain {fig['t_train']:.3f}")
    print(f"asynchronous (η={args.eta}): {med[args.eta]['s_per_step']:.3f} s/step, "
          f"waiting for data {100 * med[args.eta]['wait_data_share']:.0f}%, lag mean {med[args.eta]['lag_mean']:.2f}")
    if "t_cores" in fig:
        print(f"CPU per step in the synchronous run: learner {med[0]['learner_cpu_per_step']:.3f} s, actor "
              f"{med[0]['actor_cpu_per_step']:.3f} s; on {cores} cores a step needs at least {fig['t_cores']:.3f} s: "
              f"cores' bound {fig['bound_cores']:.3f}, ratio against it {fig['ratio_cores']:.3f}")
    print(f"speedup {fig['speedup']:.3f}, ideal bound (Tgen + Ttrain) / max(Tgen, Ttrain) {fig['bound']:.3f}")
    out = {"eta": args.eta, "steps": args.steps, "rounds": args.rounds, "median": {f"eta{e}": v for e, v in med.items()},
           "runs": {f"eta{e}": v for e, v in runs.items()}, **fig}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "pipeline.json").write_text(json.dumps(out, indent=2))
    print(f"ratio {fig['ratio']:.3f}", flush=True)
    return out


if __name__ == "__main__":
    main()
