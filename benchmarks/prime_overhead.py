"""PRIME's learner cost against outcome-only RLOO, side by side in one process, by phase.

    .venv/bin/python benchmarks/prime_overhead.py [--config configs/tiny.yaml] [--steps 12]
        [--threads 1] [--groups 16] [--prompt-len 20] [--resp-len 48] [--both-prm-thread]
        [--rloo-threads N] [key=value ...]

What runs: two real learners (``learner.trainer.Learner``: ``build_models`` and
``prime_step``, no weight publish) built from the same config and the same starting policy
(``model.policy_path``; by default the shipped warm-up of the embedded task), one with the
config as given (PRIME) and one with ``prime.use_process_rewards=false`` (outcome-only RLOO:
no reference or PRM pass). Each timed step feeds both the same synthetic trajectory groups
(random tokens of the model's vocabulary, prompt length fixed, response lengths uniform in
[resp_len/2, resp_len], 1..k-1 correct per group so every group counts); the order of the
two flips every step so a shared machine's load drifts fall on both alike. Threads:
``--threads`` torch intra-op threads for both (the local run's learner gets 1).

Phases from the step's own timers: ``prm`` (reference forward + PRM update; the rewards
come from the PRM's training forward in prm_update=after), ``old_logp`` (π_old, when
loss.correction needs it), ``policy`` (policy forward/backward), ``prm_wait`` (the end of
the step waiting for the PRM's update on the side thread, ``placement.prm_thread``: with it
the ``prm`` phase is only the reference and PRM forwards, which run side by side, and the
PRM's backward runs during ``policy``). The learner's time is their sum: the step's wall
time. ``--both-prm-thread`` (or ``--sequential``) adds PRIME with ``placement.prm_thread``
the other way from the config (off in configs/tiny.yaml since 2026-12-08) as a third
learner. Figures are medians over
the timed steps; the last line is ``ratio R`` = PRIME's learner seconds per step over
RLOO's (the issue's goal: R ≤ 1.3).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

PHASES = {"prm": "time/prm_s", "old_logp": "time/old_logp_s", "policy": "time/policy_s",
          "prm_wait": "time/prm_wait_s"}


def default_policy(cfg) -> str:
    """The shipped warm-up of ``cfg``'s recipe (installed into the cache when missing)."""
    from actors.tasks.warmup import warmup

    return str(warmup(None, cfg.task, cfg.warmup, use_shipped=True)["model_dir"])


@functools.cache
def _bench_learner():
    """benchmarks/learner.py, loaded once by path (its module name is the package's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_learner", ROOT / "benchmarks" / "learner.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_groups(*a, **kw):
    """benchmarks/learner.py's generator."""
    return _bench_learner().synthetic_groups(*a, **kw)


def learner_for(config: str, overrides: list[str], run_dir: Path, extra: list[str]):
    from common.config import load_config
    from learner.trainer import Learner

    cfg = load_config(config, [*overrides, f"run.output_dir={run_dir}", "checkpoint.every=0", *extra])
    return Learner(cfg, sender=None)


def step_seconds(learner, groups) -> dict[str, float]:
    """One ``prime_step`` on ``groups``; its phase seconds and their sum."""
    from learner.rollout import build_batch
    from learner.step import prime_step

    batch = build_batch(groups).to(learner.device)
    m = prime_step(learner.models, batch, learner.cfg, learner.policy_version)
    learner.policy_version += 1
    out = {ph: m.get(key, 0.0) for ph, key in PHASES.items()}
    out["learner"] = sum(out.values())
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--steps", type=int, default=12, help="timed steps per learner [steps]")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first [steps]")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads [threads]")
    ap.add_argument("--groups", type=int, default=None, help="groups per step (default: batch.prompts_per_step)")
    ap.add_argument("--prompt-len", type=int, default=20, help="[tokens]")
    ap.add_argument("--resp-len", type=int, default=None, help="longest response (default: generation.max_tokens) [tokens]")
    ap.add_argument("--both-prm-thread", "--sequential", dest="both_prm_thread", action="store_true",
                    help="also PRIME with placement.prm_thread the other way from the config "
                         "(prime-seq: the phases in sequence; prime-thread: the PRM's work on a side thread)")
    ap.add_argument("--rloo-threads", type=int, default=0,
                    help="also RLOO with this many torch threads (does a second core help it too?) [threads]")
    ap.add_argument("--output", help="write the figures here (JSON)")
    ap.add_argument("overrides", nargs="*", help="config overrides for both learners (key=value)")
    args = ap.parse_args(argv)

    import torch

    from common.config import load_config

    torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    if not any(o.startswith("model.policy_path=") for o in overrides) and cfg.task.kind == "arithmetic":
        overrides.append(f"model.policy_path={default_policy(cfg)}")
        cfg = load_config(args.config, overrides)
    groups_n = args.groups or cfg.batch.prompts_per_step
    resp_len = args.resp_len or cfg.generation.max_tokens
    tmp = Path(tempfile.mkdtemp(prefix="prime-overhead-"))
    learners = {"prime": learner_for(args.config, overrides, tmp / "prime", []),
                "rloo": learner_for(args.config, overrides, tmp / "rloo", ["prime.use_process_rewards=false"])}
    threads = {}  # torch threads of a learner other than --threads
    if args.both_prm_thread:
        name = "prime-thread" if not cfg.placement.prm_thread else "prime-seq"
        learners[name] = learner_for(args.config, overrides, tmp / name,
                                     [f"placement.prm_thread={str(not cfg.placement.prm_thread).lower()}"])
    if args.rloo_threads:
        name = f"rloo-{args.rloo_threads}t"
        learners[name] = learner_for(args.config, overrides, tmp / name, ["prime.use_process_rewards=false"])
        threads[name] = args.rloo_threads
    vocab = learners["prime"].models.policy.get_input_embeddings().num_embeddings
    rows: dict[str, list[dict]] = {name: [] for name in learners}
    for s in range(args.warmup + args.steps):
        groups = synthetic_groups(groups_n, cfg.generation.k, vocab, args.prompt_len, resp_len, seed=s)
        names = list(learners)
        order = names[s % len(names):] + names[: s % len(names)]  # rotate: load drifts fall on all alike
        if (s // len(names)) % 2:
            order.reverse()
        for name in order:
            torch.set_num_threads(threads.get(name, args.threads))
            r = step_seconds(learners[name], groups)
            if s >= args.warmup:
                rows[name].append(r)
    shutil.rmtree(tmp, ignore_errors=True)  # the two runs' resolved configs only
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rows.items()}
    ratio = med["prime"]["learner"] / med["rloo"]["learner"]
    print(f"learner seconds per step, median of {args.steps} interleaved steps, {args.threads} thread(s), "
          f"{groups_n}x{cfg.generation.k} responses (prompt {args.prompt_len}, responses ≤ {resp_len} tokens)")
    print("| phase | " + " | ".join(f"{n} s" for n in med) + " |\n|---|" + "---:|" * len(med))
    for ph in (*PHASES, "learner"):
        print(f"| {ph} | " + " | ".join(f"{med[n][ph]:.3f}" for n in med) + " |")
    for name in med:
        if name not in ("prime", "rloo"):
            print(f"{name}: {med[name]['learner'] / med['rloo']['learner']:.3f} x RLOO's learner time")
    out = {"medians": med, "steps": rows, "ratio": ratio,
           "args": {k: v for k, v in vars(args).items()}}
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"PRIME learner time over outcome-only RLOO's: ratio {ratio:.3f}")
    return out


if __name__ == "__main__":
    main()
