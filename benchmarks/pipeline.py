"""Does asynchrony pay? The same run synchronous (η = 0) and asynchronous (η ≥ 1), side by side.

    .venv/bin/python benchmarks/pipeline.py [--eta 1] [--steps 40] [--rounds 2] [--skip 3]
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
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from benchmarks.staleness import measure_run  # noqa: E402


def overlap_figures(sync: dict, asyn: dict) -> dict:
    """Tgen, Ttrain, speedup, bound and ratio from a synchronous and an asynchronous run's
    figures (``run_figures``: ``s_per_step``, ``wait_data_share``). Seconds per step."""
    t_gen = sync["s_per_step"] * sync["wait_data_share"]
    t_train = sync["s_per_step"] - t_gen
    if t_train <= 0 or t_gen < 0:
        raise ValueError(f"synchronous run has no learner compute time (wait share {sync['wait_data_share']:.2f})")
    speedup = sync["s_per_step"] / asyn["s_per_step"]
    bound = (t_gen + t_train) / max(t_gen, t_train)
    return {"t_gen": t_gen, "t_train": t_train, "speedup": speedup, "bound": bound, "ratio": speedup / bound}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eta", type=int, default=1, help="staleness bound of the asynchronous run [policy versions]")
    ap.add_argument("--steps", type=int, default=40, help="learner steps per run [steps]")
    ap.add_argument("--rounds", type=int, default=2, help="runs per mode, interleaved [runs]")
    ap.add_argument("--skip", type=int, default=3, help="start-up steps left out of the timing [steps]")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--output-dir", default="runs/pipeline", help="one sub-directory per run [path]")
    ap.add_argument("--with-eval", action="store_true", help="run the evaluator beside (default: off)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = ap.parse_args(argv)
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

    med = {e: {k: statistics.median(f[k] for f in figs) for k in ("s_per_step", "wait_data_share", "lag_mean")}
           for e, figs in runs.items()}
    fig = overlap_figures(med[0], med[args.eta])
    print(f"synchronous (η=0): {med[0]['s_per_step']:.3f} s/step = Tgen {fig['t_gen']:.3f} + Ttrain {fig['t_train']:.3f}")
    print(f"asynchronous (η={args.eta}): {med[args.eta]['s_per_step']:.3f} s/step, "
          f"waiting for data {100 * med[args.eta]['wait_data_share']:.0f}%, lag mean {med[args.eta]['lag_mean']:.2f}")
    print(f"speedup {fig['speedup']:.3f}, ideal bound (Tgen + Ttrain) / max(Tgen, Ttrain) {fig['bound']:.3f}")
    out = {"eta": args.eta, "steps": args.steps, "rounds": args.rounds, "median": {f"eta{e}": v for e, v in med.items()},
           "runs": {f"eta{e}": v for e, v in runs.items()}, **fig}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "pipeline.json").write_text(json.dumps(out, indent=2))
    print(f"ratio {fig['ratio']:.3f}", flush=True)
    return out


if __name__ == "__main__":
    main()
