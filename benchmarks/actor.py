"""Tokens/s of the full actor loop against the bare engine, side by side in one run.

    .venv/bin/python benchmarks/actor.py [--engine vllm|vllm-async|hf] [--model smollm2|DIR]
        [--prompts-per-batch 8] [--k 4] [--max-tokens 128] [--batches 3] [--rounds 3]

One engine is built once and shared by both paths (SmolLM2-135M-Instruct from
``launch/prepare_model.py``'s cache by default; its chat template; arithmetic prompts with
the PRIME math suffix):
- bare: ``engine.generate`` on ``--batches`` batches of ``--prompts-per-batch`` prompts, K
  samples each, back to back; nothing else.
- actor: ``actors.actor.Actor.run`` on the same prompts (JSONL prompt source with cursor, chat
  templating, every response verified by the real math verifier in a ``VerifierPool``
  process, overlapped with the next batch; groups built and sent under credit over ZeroMQ to
  a real ``LearnerServer`` in this process, which validates and counts them; metrics and
  heartbeats).
Each round runs both paths (order alternating); tokens/s = generated tokens / wall seconds
of the path. The last line is ``ratio R``: the median over rounds of actor/bare within a
round (load from other jobs on a shared machine cancels within a pair).
Run it under ``if __name__ == "__main__":`` only (vLLM starts its engine with spawn).
"""

import argparse
import logging
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from actors.actor import Actor  # noqa: E402
from actors.engines import make_engine  # noqa: E402
from actors.prompts import PromptSource, to_token_ids, write_jsonl  # noqa: E402
from actors.verifiers.pool import VerifierPool  # noqa: E402
from common.config import PrimeRunConfig  # noqa: E402
from common.transport import ActorClient, LearnerServer  # noqa: E402

SUFFIX = "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
        rows.append({"id": f"q{i}", "prompt": f"What is ({a} + {b}) * {c}?{SUFFIX}", "answer": str((a + b) * c)})
    return rows


def model_dir(name: str) -> str:
    if name == "smollm2":
        from actors.prepare_model import prepare_model

        return str(prepare_model("smollm2-135m-instruct"))
    return name


def run_bare(engine, prompt_ids, args, seed) -> tuple[int, float]:
    n = args.prompts_per_batch
    t0, tokens = time.monotonic(), 0
    for b in range(args.batches):
        out = engine.generate(prompt_ids[b * n:(b + 1) * n], k=args.k, temperature=args.temperature,
                              max_tokens=args.max_tokens, seed=seed + b)
        tokens += sum(len(s.token_ids) for per in out for s in per)
    return tokens, time.monotonic() - t0


def run_actor(engine, pool, tokenizer, rows_path, cfg, args, rnd) -> tuple[int, float, dict]:
    server = LearnerServer(cfg.transport, max_staleness=cfg.async_.max_staleness).start()
    tcfg = cfg.transport.model_copy(update={"trajectory_addr": server.trajectory_endpoint,
                                            "control_addr": server.control_endpoint})
    received, stop = [], threading.Event()

    def drain():
        while not stop.is_set():
            env = server.recv_group(timeout=0.2)
            if env is not None:
                received.append(env)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    client = ActorClient(tcfg, f"bench-{rnd}").start()
    actor = Actor(cfg, f"bench-{rnd}", engine, pool, client, PromptSource(rows_path), tokenizer=tokenizer,
                  prompts_per_batch=args.prompts_per_batch, verifier_kind="math")
    n_groups = args.prompts_per_batch * args.batches
    t0 = time.monotonic()
    summary = actor.run(max_groups=n_groups)
    while len(received) < summary["groups_sent"] and time.monotonic() - t0 < 600:
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    stop.set()
    drainer.join()
    counters = server.counters()
    server.close()
    rewards = [r.outcome_reward for env in received for r in env.body.responses]
    info = {"groups": len(received), "rejected": counters["rejected"], "sent": summary["groups_sent"],
            "dropped": summary["groups_dropped_verifier"], "accuracy": sum(rewards) / max(1, len(rewards))}
    return int(summary["tokens"]), elapsed, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="vllm", choices=["vllm", "vllm-async", "hf"])
    ap.add_argument("--model", default="smollm2", help="'smollm2' or a transformers model directory")
    ap.add_argument("--prompts-per-batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batches", type=int, default=3, help="generation batches per path per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--verifier-workers", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoTokenizer

    path = model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    options = {"max_model_len": 1024} if args.engine.startswith("vllm") else {"device": "cpu"}
    engine = make_engine(args.engine, path, **options)
    n = args.prompts_per_batch * args.batches
    cfg = PrimeRunConfig(
        generation={"engine": args.engine, "k": args.k, "temperature": args.temperature,
                    "max_tokens": args.max_tokens, "max_prompt_tokens": 512},
        transport={"trajectory_addr": "tcp://127.0.0.1:*", "control_addr": "tcp://127.0.0.1:*"},
    )
    print(f"engine {args.engine}, model {path}, {args.prompts_per_batch} prompts x {args.k} samples x "
          f"<= {args.max_tokens} tokens, {args.batches} batches per path, {args.rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory() as tmp, VerifierPool(num_workers=args.verifier_workers) as pool:
        engine.generate([to_token_ids("Hi", tokenizer)], k=1, max_tokens=8, seed=0)  # warm-up
        ratios, bare_rates, actor_rates = [], [], []
        for rnd in range(args.rounds):
            rows = arithmetic_rows(n, seed=rnd)
            rows_path = Path(tmp) / f"round{rnd}.jsonl"
            write_jsonl(rows_path, rows)
            prompt_ids = [to_token_ids(r["prompt"], tokenizer) for r in rows]
            res = {}
            for path_name in (("bare", "actor") if rnd % 2 == 0 else ("actor", "bare")):
                if path_name == "bare":
                    res["bare"] = run_bare(engine, prompt_ids, args, seed=1000 * rnd)
                else:
                    res["actor"] = run_actor(engine, pool, tokenizer, rows_path, cfg, args, rnd)
            (bt, bs), (at, as_, info) = res["bare"], res["actor"]
            bare_rates.append(bt / bs)
            actor_rates.append(at / as_)
            ratios.append(actor_rates[-1] / bare_rates[-1])
            print(f"round {rnd}: bare {bt} tok in {bs:.1f} s = {bt / bs:.0f} tok/s; actor {at} tok in {as_:.1f} s = "
                  f"{at / as_:.0f} tok/s ({info['groups']} groups received, {info['rejected']} rejected, "
                  f"{info['dropped']} dropped by verifier errors, accuracy {info['accuracy']:.2f}); "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    engine.close()
    print(f"bare {statistics.median(bare_rates):.0f} tok/s, actor {statistics.median(actor_rates):.0f} tok/s "
          f"(medians); ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
