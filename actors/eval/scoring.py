"""Scoring: every response through the verifier pool under the one verdict policy, then
per-benchmark accuracy, pass@k, the table and the JSON (``actors.eval`` is the contract)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from actors.eval.items import DISPLAY, EvalItem
from actors.verifiers.verdict import is_error

CORRECT = {"math": "correct", "code": "passed"}   # the status of a correct response, per kind
VERIFY_TIMEOUT_S = {"math": 5.0, "code": 10.0}    # evaluation's verifier time limits [s]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


@dataclass
class BenchmarkScore:
    benchmark: str
    problems: int
    samples: int  # per problem
    accuracy: float  # %, greedy pass@1 or avg@K
    pass_at: dict[int, float]  # %, unbiased pass@k
    errors: int  # responses the verifier could not judge (left out of accuracy and pass@k)
    truncated: int  # responses cut at max_tokens
    mean_tokens: float
    statuses: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0  # verdicts that ran out of time (errors or wrong, per the policy)


@dataclass
class ResponseRecord:
    benchmark: str
    item_id: str
    sample: int
    response: str
    extracted: str | None  # final answer (math) or the program (code) the verifier sees
    reference: str
    status: str
    reward: float
    correct: bool
    error: bool
    detail: str
    finish_reason: str
    num_tokens: int
    verify_s: float = 0.0


@dataclass
class EvalResult:
    records: list[ResponseRecord]
    scores: dict[str, BenchmarkScore]
    config: dict
    timings: dict = field(default_factory=dict)
    prompts: dict[tuple[str, str], str] = field(default_factory=dict)  # (benchmark, id) -> prompt text

    @property
    def greedy(self) -> bool:
        return self.config.get("samples", 1) == 1 and self.config.get("temperature", 0.0) == 0

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.scores.values())

    def average(self) -> dict[str, float]:
        """Unweighted mean over benchmarks of the accuracy and of each pass@k."""
        if not self.scores:
            return {}
        vals = list(self.scores.values())
        out = {"accuracy": sum(s.accuracy for s in vals) / len(vals)}
        for k in vals[0].pass_at:
            out[f"pass@{k}"] = sum(s.pass_at.get(k, 0.0) for s in vals) / len(vals)
        return out

    def table(self, title: str | None = None) -> str:
        return render_table(self.scores, self.config, title=title)

    def to_json(self) -> dict:
        by_problem: dict[tuple[str, str], list[ResponseRecord]] = defaultdict(list)
        for r in self.records:
            by_problem[(r.benchmark, r.item_id)].append(r)
        problems = []
        for (bench, iid), recs in by_problem.items():
            n, c = len(recs), sum(r.correct for r in recs)
            problems.append({"benchmark": bench, "item_id": iid, "prompt": self.prompts.get((bench, iid)),
                             "reference": recs[0].reference, "n": n, "correct": c,
                             "errors": sum(r.error for r in recs)})
        return {
            "config": self.config,
            "timings": self.timings,
            "scores": {k: asdict(v) for k, v in self.scores.items()},
            "average": self.average(),
            "errors": self.errors,
            "table": self.table(),
            "problems": problems,
            "records": [asdict(r) for r in self.records],
        }

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        return path


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def score_benchmarks(records: Sequence[ResponseRecord], ks: Sequence[int] = ()) -> dict[str, BenchmarkScore]:
    """Per-benchmark scores (benchmarks in first-seen order) of the records. Accuracy and
    pass@k are over the judged responses of each problem (``ResponseRecord.error`` ones left
    out; a problem with none judged is left out, pass@k over the problems judged ≥ k times)."""
    groups: dict[str, dict[str, list[ResponseRecord]]] = {}
    for r in records:
        groups.setdefault(r.benchmark, {}).setdefault(r.item_id, []).append(r)
    scores = {}
    for bench, problems in groups.items():
        ns = {len(v) for v in problems.values()}
        if len(ns) != 1:
            raise ValueError(f"{bench}: problems have different sample counts {sorted(ns)}")
        n = ns.pop()
        # (judged responses, correct ones) per problem: errors are left out, never scored 0
        judged = [(m, c) for m, c in ((sum(not r.error for r in v), sum(r.correct for r in v))
                                      for v in problems.values()) if m]
        recs = [r for v in problems.values() for r in v]
        statuses: dict[str, int] = defaultdict(int)
        for r in recs:
            statuses[r.status] += 1
        scores[bench] = BenchmarkScore(
            benchmark=bench, problems=len(problems), samples=n,
            accuracy=_mean([100.0 * c / m for m, c in judged]),
            pass_at={k: _mean([100.0 * pass_at_k(m, c, k) for m, c in judged if m >= k]) for k in ks if k <= n},
            errors=sum(r.error for r in recs), truncated=sum(r.finish_reason == "length" for r in recs),
            mean_tokens=sum(r.num_tokens for r in recs) / len(recs), statuses=dict(statuses),
            timeouts=statuses.get("timeout", 0),
        )
    return scores


def render_table(scores: dict[str, BenchmarkScore], config: dict | None = None, title: str | None = None) -> str:
    """Markdown table: one column per benchmark + the unweighted average (PRIME Table 1)."""
    config = config or {}
    benches = list(scores)
    samples = next(iter(scores.values())).samples if scores else 1
    greedy = samples == 1 and config.get("temperature", 0.0) == 0
    acc_name = "pass@1 (greedy)" if greedy else (f"avg@{samples}" if samples > 1 else "pass@1 (sampled)")
    head = ["metric"] + [DISPLAY.get(b, b) for b in benches] + ["Avg."]
    rows: list[list[str]] = []

    def metric_row(name: str, vals: list[float]) -> list[str]:
        avg = sum(vals) / len(vals) if vals else float("nan")
        return [name] + [f"{v:.1f}" for v in vals] + [f"{avg:.1f}"]

    rows.append(metric_row(f"{acc_name}, %", [scores[b].accuracy for b in benches]))
    ks = sorted({k for s in scores.values() for k in s.pass_at if k > 1})  # pass@1 is the accuracy row
    for k in ks:
        rows.append(metric_row(f"pass@{k}, %", [scores[b].pass_at.get(k, float("nan")) for b in benches]))
    total = lambda attr: sum(getattr(scores[b], attr) for b in benches)  # noqa: E731
    rows.append(["problems"] + [str(scores[b].problems) for b in benches] + [str(total("problems"))])
    rows.append(["verifier errors"] + [str(scores[b].errors) for b in benches] + [str(total("errors"))])
    rows.append(["verifier timeouts"] + [str(scores[b].timeouts) for b in benches] + [str(total("timeouts"))])
    rows.append(["truncated"] + [str(scores[b].truncated) for b in benches] + [str(total("truncated"))])
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" + "---:|" * (len(head) - 1))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _extracted(kind: str, response: str) -> str | None:
    if kind == "math":
        from actors.verifiers.math_verifier import extract_answer

        return extract_answer(response)
    if kind == "code":
        from actors.verifiers.code_verifier import extract_code

        return extract_code(response)[0]
    return None


def submit_responses(pool, items: Sequence[EvalItem], responses: Sequence[Sequence[str]],
                     timeouts_s: dict[str, float] | None = None) -> list[list[Future]]:
    """Submit every response to the pool; ``responses[i]`` are item i's samples."""
    timeouts = {**VERIFY_TIMEOUT_S, **(timeouts_s or {})}
    return [[pool.submit(it.kind, text, it.reference, timeouts.get(it.kind)) for text in resp]
            for it, resp in zip(items, responses)]


def make_record(item: EvalItem, sample: int, response: str, verdict_or_exc: Any, finish_reason: str = "stop",
                num_tokens: int = 0, math_timeout: str = "wrong") -> ResponseRecord:
    """The record of one response from its verdict (or the exception its future raised)."""
    if isinstance(verdict_or_exc, BaseException):
        status, reward, detail, elapsed = "error", 0.0, f"verifier pool failed: {verdict_or_exc!r}", 0.0
        error = True
    else:
        v = verdict_or_exc
        status, reward, detail, elapsed = v.status, float(v.reward), v.detail, float(v.elapsed_s)
        error = is_error(status, item.kind, math_timeout)
    return ResponseRecord(
        benchmark=item.benchmark, item_id=item.item_id, sample=sample, response=response,
        extracted=_extracted(item.kind, response), reference=item.reference_text(), status=status,
        reward=reward, correct=(not error) and status == CORRECT.get(item.kind), error=error,
        detail=detail, finish_reason=finish_reason, num_tokens=num_tokens, verify_s=elapsed,
    )


def _result_of(fut: Future) -> Any:
    try:
        return fut.result()
    except Exception as e:  # noqa: BLE001 - a pool failure becomes an error record
        return e


def score_responses(items: Sequence[EvalItem], responses: Sequence[Sequence[str]], pool=None,
                    ks: Sequence[int] = (), timeouts_s: dict[str, float] | None = None,
                    progress: bool = False, math_timeout: str = "wrong"
                    ) -> tuple[list[ResponseRecord], dict[str, BenchmarkScore]]:
    """Score given response texts (no engine): the scoring path of ``evaluate``."""
    own = pool is None
    if own:
        pool = make_pool()
    try:
        futs = submit_responses(pool, items, responses, timeouts_s)
        bar = _bar(sum(len(f) for f in futs), "verify", progress)
        records = []
        for it, resp, fs in zip(items, responses, futs):
            for j, (text, fut) in enumerate(zip(resp, fs)):
                records.append(make_record(it, j, text, _result_of(fut), math_timeout=math_timeout))
                bar.update(1)
        bar.close()
    finally:
        if own:
            pool.close()
    return records, score_benchmarks(records, ks)


def make_pool(workers: int | None = None):
    """A verifier pool for evaluation (math and code, evaluation time limits)."""
    from actors.verifiers.pool import VerifierPool

    n = workers or max(1, min(4, os.cpu_count() or 1))
    return VerifierPool(num_workers=n, max_queue=512, kind_timeouts_s=dict(VERIFY_TIMEOUT_S))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="resp", dynamic_ncols=True)


