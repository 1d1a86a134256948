"""Actor entry point: supervise ``actors.num`` actor processes on this machine, or run one.

    python launch/actors.py --config FILE [key=value ...]          # supervisor: M actors
    python launch/actors.py --config FILE --slot I [key=value ...]  # one actor (what the supervisor starts)
    python launch/actors.py --config FILE --evaluator [key=value ...]  # periodic held-out evaluation

The learner's addresses come from ``transport.trajectory_addr`` / ``transport.control_addr``
(point them at the learner's host on a cluster); weights come from where the learner's
``PolicyUpdate`` says. Ctrl-C / SIGTERM stops every actor (in-flight groups are finished
within ``actors.stop_grace_s`` or dropped, and the log says which).
"""

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from common.config import ConfigError, load_config  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--slot", type=int, help="run one actor, slot I of actors.num (default: supervise all)")
    ap.add_argument("--evaluator", action="store_true", help="run the held-out evaluator (actors/eval/heldout.py)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actors.num=2")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        ap.exit(2, f"error: {e}\n")
    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.evaluator:
        from actors.eval.heldout import run_evaluator_process

        run_evaluator_process(cfg)
        return
    if args.slot is not None:
        from actors.process import run_actor_process

        run_actor_process(cfg, args.slot)
        return
    if args.overrides:  # the children read the file: give them the resolved config
        from common.config import save_resolved

        args.config = str(save_resolved(cfg, Path(cfg.run.output_dir) / "actors"))
    from actors.supervisor import run_supervisor

    sys.exit(1 if run_supervisor(cfg, args.config) else 0)


if __name__ == "__main__":
    main()
