"""Supervised warm-up of the default run's starting policy (logic: actors/tasks/warmup.py):

    python launch/warmup.py [--config configs/tiny.yaml] [--output DIR] [key=value ...]
    python launch/warmup.py --ship     # build the recipe and ship it in actors/tasks/shipped/<key>
    python launch/warmup.py --verify   # retrain the shipped recipe from scratch and compare

Trains the tiny Qwen2 on the embedded task's demonstrations until its held-out accuracy
plateaus (or fetches it from ``warmup.cache_dir``) and copies the model directory, its
``warmup.json`` and the prompt files (``data/{train,dev,heldout}.jsonl``) into ``--output``
(default: ``model.policy_path``). Prints the plateau figures. A recipe that the project
ships (``actors/tasks/shipped/``, logic ``actors/tasks/shipped.py``) is installed from there,
checksums verified, instead of trained.
"""

import argparse
import json
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
    ap.add_argument("--output", help="model directory to write (default: model.policy_path)")
    ap.add_argument("--ship", action="store_true", help="build (or take from the cache) and ship this recipe")
    ap.add_argument("--verify", action="store_true", help="retrain the shipped recipe and compare (exit 1 if it differs)")
    ap.add_argument("--tol", type=float, default=0.03, help="--verify: largest held-out accuracy difference "
                    "accepted when the weights are not bit-identical [fraction]")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.slip_share=0.2 warmup.lr=1e-3")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        ap.exit(2, f"error: {e}\n")
    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from actors.tasks.warmup import warmup

    if args.ship or args.verify:
        from actors.tasks import shipped

        if args.ship:
            print(f"shipped: {shipped.ship(cfg.task, cfg.warmup)}")
            return
        out = shipped.verify_rebuild(cfg.task, cfg.warmup, tol=args.tol)
        print(json.dumps(out, indent=1))
        sys.exit(0 if out["ok"] else 1)
    result = warmup(args.output or cfg.model.policy_path, cfg.task, cfg.warmup)
    keys = ("model_dir", "cache_dir", "cached", "heldout_sampled", "heldout_greedy", "heldout_breakdown",
            "heldout_sampled_if_no_slips", "demo_accuracy", "slip_share", "steps", "plateau_step", "stop_reason",
            "total_seconds", "prompt_files")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=1))


if __name__ == "__main__":
    main()
