"""Check a config for a (multi-host) run without training; exit status 1 on any error.

    python launch/check.py --config CFG [--role static|learner|actor|local] [--reach HOST] [key=value ...]

--role static (default): addresses parse, CURVE key files present and consistent when an
endpoint leaves loopback, model/data paths exist, GPU lists fit this host, the weight-sync
backend suits the device (nccl needs CUDA). --role learner: the learner's fields, and that
its ports can be bound here. --role actor: the actors' fields, and that this host reaches
the RUNNING learner's transport endpoints (ZeroMQ handshake with the actor's key) and its
weight-sync store; --reach HOST implies it and connects to HOST instead of the config's
hosts. --role local: one machine (what launch/run.py --check runs). Every error names the
config field. The checks: common/cluster_check.py.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from common.config import ConfigError, load_config  # noqa: E402


def main(argv=None):
    from common.cluster_check import ROLES, check_cluster, report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="YAML config (default: configs/tiny.yaml)")
    ap.add_argument("--role", choices=ROLES, default="static", help="what this host runs (default: static checks only)")
    ap.add_argument("--reach", metavar="HOST", help="check that HOST (the learner's) is reachable on the config's ports")
    ap.add_argument("--nproc-per-node", type=int, help="learner ranks on this node (checked against actors.learner_gpus)")
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds per connection attempt (default 3)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. transport.curve_secret_key=keys/learner.key_secret")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        ap.exit(2, f"error: {e}\n")
    findings = check_cluster(cfg, args.role, reach_host=args.reach, nproc_per_node=args.nproc_per_node,
                             timeout_s=args.timeout)
    role = "actor" if args.reach else args.role
    sys.exit(report(findings, title=f"{args.config} (role {role})"))


if __name__ == "__main__":
    main()
