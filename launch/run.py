"""One-machine launcher: the learner under torchrun, the actors and the evaluator as child
processes, one live progress view; nothing is left running when it ends or is interrupted.

    python launch/run.py [--config FILE] [--steps N] [--output-dir DIR] [--nproc-per-node N] [key=value ...]
    python launch/run.py --selfcheck [--no-vllm]     # the setup self-check (launch/selfcheck.py)
    python launch/run.py --check [--config FILE] [key=value ...]   # check the config, ports, keys, GPUs (launch/check.py)

Default config: configs/tiny.yaml, the embedded arithmetic task on CPU (launch/local.py
says what a run does and writes).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from common.config import ConfigError, load_config  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="YAML config (default: configs/tiny.yaml)")
    ap.add_argument("--steps", type=int, help="shorthand for run.steps=N")
    ap.add_argument("--output-dir", help="shorthand for run.output_dir=DIR")
    ap.add_argument("--nproc-per-node", type=int, default=1, help="learner ranks (torchrun --nproc-per-node)")
    ap.add_argument("--selfcheck", action="store_true", help="run the setup self-check instead of training")
    ap.add_argument("--no-vllm", action="store_true", help="self-check: sample with torch instead of vLLM")
    ap.add_argument("--check", action="store_true", help="check the config for this machine (launch/check.py --role local) instead of training")
    ap.add_argument("--resume", metavar="DIR", help="finish the interrupted run in DIR: its saved config.yaml (overrides "
                    "still apply), from its newest checkpoint, in the same run directory")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. prime.beta=0.1")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    if args.output_dir is not None:
        overrides.append(f"run.output_dir={args.output_dir}")
    if args.resume is not None:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            ap.exit(2, f"error: --resume {args.resume}: no config.yaml there (not a run directory)\n")
        args.config = str(saved)
        overrides += [f"run.output_dir={args.resume}", "checkpoint.resume=true"]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        ap.exit(2, f"error: {e}\n")
    return cfg, args


def main(argv=None):
    cfg, args = parse(argv)
    if args.check:  # the children of a run work in ROOT: resolve relative paths there
        from common.cluster_check import check_cluster, report

        findings = check_cluster(cfg, "local", nproc_per_node=args.nproc_per_node, base=ROOT)
        sys.exit(report(findings, title=f"{args.config} (one machine)"))
    import logging

    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.selfcheck:
        return selfcheck(cfg, args)
    from launch.local import run_local

    import signal

    # Ctrl-C works even where the shell started us with SIGINT ignored (a background job);
    # run_local installs its own handlers once processes exist
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run_local(cfg, nproc_per_node=args.nproc_per_node)
    except KeyboardInterrupt as e:
        sys.exit(f"interrupted: {e}" if str(e) else "interrupted")
    except RuntimeError as e:
        sys.exit(f"error: {e}")


def selfcheck(cfg, args):
    from rich.console import Console
    from rich.table import Table

    from launch.selfcheck import run_selfcheck

    console = Console()
    console.print("[bold]Self-check[/bold]")
    result = run_selfcheck(cfg, cfg.run.output_dir, use_vllm=not args.no_vllm)
    table = Table("check", "value")
    for k, v in result.items():
        table.add_row(k, f"{v:.3g}" if isinstance(v, float) else str(v))
    console.print(table)
    console.print(f"self-check passed in {result['total_s']} s; run directory: {cfg.run.output_dir}")


if __name__ == "__main__":
    main()
