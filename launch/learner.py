"""The learner entry point, started by torchrun on every rank:

    torchrun --nproc-per-node N launch/learner.py --config configs/tiny.yaml [key=value ...]

Multi-node: the usual torchrun rendezvous (--nnodes, --node-rank, --rdzv-endpoint).
"""

import argparse
import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from common.config import ConfigError, load_config  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--resume", action="store_true", help="resume from <run.output_dir>/checkpoints")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. prime.beta=0.1")
    args = ap.parse_args(argv)
    overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        ap.exit(2, f"error: {e}\n")
    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from learner.trainer import run_learner

    run_learner(cfg)


if __name__ == "__main__":
    main()
