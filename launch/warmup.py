"""Supervised warm-up of the default run's starting policy (logic: actors/tasks/warmup.py):

    python launch/warmup.py [--config configs/tiny.yaml] [--output DIR] [key=value ...]

Trains the tiny Qwen2 on the embedded task's demonstrations until its held-out accuracy
plateaus (or fetches it from ``warmup.cache_dir``) and copies the model directory, its
``warmup.json`` and the prompt files (``data/{train,dev,heldout}.jsonl``) into ``--output``
(default: ``model.policy_path``). Prints the plateau figures.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import ConfigError, load_config  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--output", help="model directory to write (default: model.policy_path)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.slip_share=0.2 warmup.lr=1e-3")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        ap.exit(2, f"error: {e}\n")
    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from actors.tasks.warmup import warmup

    result = warmup(args.output or cfg.model.policy_path, cfg.task, cfg.warmup)
    keys = ("model_dir", "cache_dir", "cached", "heldout_sampled", "heldout_greedy", "heldout_breakdown",
            "heldout_sampled_if_no_slips", "demo_accuracy", "slip_share", "steps", "plateau_step", "stop_reason",
            "total_seconds", "prompt_files")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=1))


if __name__ == "__main__":
    main()
