"""Generation + scoring of evaluation items with an engine (``evaluate``), and one whole
benchmark run from a model directory (``run_eval``, behind ``launch/eval.py``); comparing two
runs' JSON (``compare_runs``). ``actors.eval`` is the contract."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from actors.eval.items import CODE_SUFFIX, DEFAULT_DATA_DIR, DISPLAY, MATH_SUFFIX, REPO_ROOT, EvalItem, load_benchmark
from actors.eval.scoring import EvalResult, _bar, _result_of, make_pool, make_record, score_benchmarks, submit_responses
from actors.prompts import to_token_ids

log = logging.getLogger(__name__)


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
    seeds: Sequence[int] | None = None,
) -> EvalResult:
    """Generate ``samples`` responses per item with ``engine`` (in chunks of ``batch_size``
    prompts), score them in ``pool`` (one is started and closed here when None) while later
    chunks generate, and return the records and per-benchmark scores (module docstring).
    ``ks`` defaults to ``(1, samples)``; ``prompt_ids`` skips tokenisation; ``seeds`` (one per
    item) overrides ``seed``: item i's sample j draws from the stream ``seeds[i] + j``."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1 (got {samples})")
    if temperature == 0 and samples != 1:
        raise ValueError("greedy decoding (temperature 0) gives one sample per problem; pass a temperature > 0")
    ks = tuple(sorted(set(ks if ks is not None else (1, samples))))
    t_start = time.perf_counter()
    ids = [list(p) for p in prompt_ids] if prompt_ids is not None else tokenize_items(items, tokenizer, system_prompt)
    if len(ids) != len(items) or (seeds is not None and len(seeds) != len(items)):
        raise ValueError("prompt_ids / seeds and items differ in length")
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
                                     max_tokens=max_tokens,
                                     seed=[seeds[i] for i in chunk] if seeds is not None else seed + start * samples)
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
