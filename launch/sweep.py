"""Ablation sweeps in one command (logic: common/sweep.py, common/sweep_report.py):

    python launch/sweep.py SWEEP.yaml [--seeds 0,1,2] [--steps N] [--cells a,b] [--output-dir DIR]
    python launch/sweep.py SWEEP.yaml --report DIR            # rebuild the report of finished runs
    python launch/sweep.py SWEEP.yaml --emit-slurm FILE [--output-dir DIR]   # one array task per run

Each (cell, seed) of the sweep file is one run of ``launch/run.py`` on this machine, one
after another; finished runs are skipped (resumable). Writes DIR/summary.json (per cell:
per-seed values and mean ± 95% CI of each figure), DIR/summary.md (the table) and
DIR/curves_step.png / DIR/curves_time.png. Presets: configs/sweeps/.
"""

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="sweep file (YAML), e.g. configs/sweeps/prime-vs-rloo.yaml")
    ap.add_argument("--seeds", help="comma-separated seeds (default: the file's)")
    ap.add_argument("--steps", type=int, help="learner steps per run (default: the file's)")
    ap.add_argument("--cells", help="comma-separated cells to run (default: all; the target's reference cell is kept)")
    ap.add_argument("--output-dir", help="where runs and the report go (default: runs/sweeps/<name>)")
    ap.add_argument("--report", metavar="DIR", help="only rebuild the report from DIR's finished runs")
    ap.add_argument("--emit-slurm", metavar="FILE", help="write a SLURM array script (one task per run) and exit")
    args = ap.parse_args(argv)

    from common.sweep import SweepError, emit_slurm, load_sweep, run_sweep
    from common.sweep_report import write_report

    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        sweep = load_sweep(args.sweep, seeds=seeds, steps=args.steps,
                           only=args.cells.split(",") if args.cells else None)
    except (SweepError, ValueError) as e:
        ap.exit(2, f"error: {e}\n")
    out = Path(args.report or args.output_dir or ROOT / "runs" / "sweeps" / sweep.name).resolve()
    if args.emit_slurm:
        path = emit_slurm(sweep, args.output_dir or f"runs/sweeps/{sweep.name}", args.emit_slurm, args.sweep)
        print(f"wrote {path}: {len(sweep.runs())} array tasks; submit with sbatch from the repository root")
        return
    summary = write_report(sweep, out) if args.report else run_sweep(sweep, out)
    print((out / "summary.md").read_text())
    print(f"report: {out / 'summary.json'}, {out / 'summary.md'}"
          + "".join(f", {out / p}" for p in summary.get("figures", [])))


if __name__ == "__main__":
    main()
