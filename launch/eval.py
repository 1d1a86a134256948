"""Evaluate a model on the PRIME paper's benchmarks (logic: actors/eval/).

    python launch/eval.py --model DIR [--benchmarks math500,aime24,amc23,minerva_math,olympiadbench,gsm8k,humaneval]
                          [--limit N] [--engine vllm|hf] [--samples K --temperature T --top-p P]
                          [--max-tokens N] [--data-dir DIR] [--output FILE] [--system-prompt TEXT]
    python launch/eval.py --compare A.json B.json

Greedy pass@1 by default; with ``--samples K`` (K > 1) avg@K and unbiased pass@K at
``--temperature`` (default 1.0). Prints a markdown table (one column per benchmark and the
average, plus verifier-error and truncation counts) and writes a JSON with every response,
its extracted answer and verdict (default ``runs/eval/<model>-<engine>-<time>.json``).
A benchmark may also be a .jsonl/.parquet prompt file (Eurus-2/verl layout). ``--compare``
prints how often two result files extracted the same answers.
"""

import argparse
import sys

if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from actors.eval import BENCHMARKS, compare_runs, run_eval  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="transformers model directory")
    ap.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                    help=f"comma-separated names ({', '.join(BENCHMARKS)}) or .jsonl/.parquet files")
    ap.add_argument("--limit", type=int, help="first N problems of each benchmark")
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    ap.add_argument("--samples", type=int, default=1, help="samples per problem (K)")
    ap.add_argument("--temperature", type=float, help="0 = greedy (default with one sample; 1.0 with several)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=1024, help="response length limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    ap.add_argument("--data-dir", help="folder of the math .jsonl sets (default actors/eval_sets, shipped)")
    ap.add_argument("--output", help="result JSON path")
    ap.add_argument("--system-prompt", help="system message put before every prompt")
    ap.add_argument("--verifier-workers", type=int, help="verifier pool processes (default min(4, cores))")
    ap.add_argument("--torch-threads", type=int,
                    help="torch intra-op threads of this process (HF engine); 1 on a small shared CPU box")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--math-timeout", choices=["wrong", "error"], default="wrong",
                    help="a math verdict that ran out of time counts as wrong (default) or as a verifier error, "
                         "as verifier.math_timeout does in training")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two result files and exit")
    args = ap.parse_args(argv)
    if args.compare:
        compare_runs(*args.compare)
        return 0
    if not args.model:
        ap.error("--model is required")
    result = run_eval(
        args.model, [b.strip() for b in args.benchmarks.split(",") if b.strip()], engine=args.engine,
        limit=args.limit, samples=args.samples, temperature=args.temperature, top_p=args.top_p,
        max_tokens=args.max_tokens, seed=args.seed, data_dir=args.data_dir, output=args.output,
        batch_size=args.batch_size, system_prompt=args.system_prompt, verifier_workers=args.verifier_workers,
        torch_threads=args.torch_threads, progress=not args.no_progress, math_timeout=args.math_timeout,
    )
    return 0 if result.records else 1


if __name__ == "__main__":
    sys.exit(main())
