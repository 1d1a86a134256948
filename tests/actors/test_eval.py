"""Evaluation harness (actors/eval/, launch/eval.py) and greedy decoding in the engines.

Checked: the unbiased pass@k estimator against hand-computed values; the markdown table;
every reference answer of the six math sets, boxed, scores correct through the scoring path
(and a wrong answer scores wrong); HumanEval's 164 canonical solutions, written as a model
would (a fenced full function), score 164/164 through the same path; a verifier error is
counted as an error, never as a silent 0; ``evaluate`` end to end with a scripted engine
(greedy and K samples, JSON contents); ``--compare``; greedy decoding in the HF engine equals
an argmax loop. Slow: vLLM greedy equals HF greedy on a tiny model; ``launch/eval.py`` on
SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from actors.engines import Sample
from actors.eval import (
    BENCHMARKS,
    CODE_SUFFIX,
    MATH_SUFFIX,
    EvalItem,
    ResponseRecord,
    answer_agreement,
    evaluate,
    humaneval_problems,
    load_benchmark,
    make_pool,
    pass_at_k,
    render_table,
    score_benchmarks,
    score_responses,
)

REPO = Path(__file__).resolve().parents[2]
MATH_SETS = [b for b in BENCHMARKS if b != "humaneval"]
SIZES = {"math500": 500, "aime24": 30, "amc23": 40, "minerva_math": 272, "olympiadbench": 675, "gsm8k": 1319}


@pytest.fixture(scope="module")
def pool():
    p = make_pool(2)
    yield p
    p.close()


# ----------------------------------------------------------------------------- pass@k
def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c / n
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 2, 3) == 1.0  # n - c < k: every k-subset holds a correct one
    assert pass_at_k(16, 1, 16) == 1.0
    for n, c, k in [(7, 3, 2), (20, 5, 10), (9, 1, 4)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    for bad in [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# ----------------------------------------------------------------------------- table
def _rec(bench, iid, sample, correct, error=False, finish="stop", tokens=10):
    status = "error" if error else ("correct" if correct else "wrong")
    return ResponseRecord(bench, iid, sample, "r", None, "1", status, float(correct), correct, error, "", finish, tokens)


def test_scores_and_table_greedy():
    recs = [_rec("gsm8k", "0", 0, True), _rec("gsm8k", "1", 0, False), _rec("gsm8k", "2", 0, False, error=True),
            _rec("gsm8k", "3", 0, True, finish="length"),
            _rec("math500", "a", 0, True), _rec("math500", "b", 0, False)]
    scores = score_benchmarks(recs, ks=(1,))
    # the error is left out: 2 correct of the 3 judged problems
    assert scores["gsm8k"].accuracy == pytest.approx(200 / 3) and scores["gsm8k"].errors == 1
    assert scores["gsm8k"].truncated == 1
    assert scores["gsm8k"].statuses == {"correct": 2, "wrong": 1, "error": 1}
    assert scores["math500"].accuracy == 50.0 and scores["math500"].problems == 2
    table = render_table(scores, {"temperature": 0.0})
    assert table == (
        "| metric | GSM8K | MATH-500 | Avg. |\n"
        "|---|---:|---:|---:|\n"
        "| pass@1 (greedy), % | 66.7 | 50.0 | 58.3 |\n"
        "| problems | 4 | 2 | 6 |\n"
        "| verifier errors | 1 | 0 | 1 |\n"
        "| verifier timeouts | 0 | 0 | 0 |\n"
        "| truncated | 1 | 0 | 1 |"
    )


def test_errors_are_left_out_per_problem_never_scored_zero():
    # p: 4 samples, one an error, 2 of the 3 judged correct; q: every sample an error (left out)
    recs = ([_rec("amc23", "p", j, j < 2, error=j == 3) for j in range(4)]
            + [_rec("amc23", "q", j, False, error=True) for j in range(4)])
    s = score_benchmarks(recs, ks=(1, 2, 4))["amc23"]
    assert s.errors == 5 and s.samples == 4 and s.problems == 2
    assert s.accuracy == pytest.approx(100 * 2 / 3) and s.pass_at[1] == pytest.approx(100 * 2 / 3)
    assert s.pass_at[2] == pytest.approx(100.0)          # 3 judged, 2 correct: every pair holds one
    assert math.isnan(s.pass_at[4])                      # no problem was judged 4 times


def test_scores_and_table_sampled():
    # 2 problems x 4 samples: 2/4 and 0/4 correct
    recs = [_rec("aime24", "p", j, j < 2) for j in range(4)] + [_rec("aime24", "q", j, False) for j in range(4)]
    s = score_benchmarks(recs, ks=(1, 2, 4))["aime24"]
    assert s.samples == 4 and s.accuracy == pytest.approx(25.0)
    assert s.pass_at[1] == pytest.approx(25.0)
    assert s.pass_at[2] == pytest.approx(100 * (1 - 1 / 6) / 2)  # (1 - C(2,2)/C(4,2) + 0) / 2
    assert s.pass_at[4] == pytest.approx(50.0)
    table = render_table({"aime24": s}, {"temperature": 1.0})
    lines = table.splitlines()
    assert lines[0] == "| metric | AIME 2024 | Avg. |"
    assert lines[2] == "| avg@4, % | 25.0 | 25.0 |"
    assert lines[3] == "| pass@2, % | 41.7 | 41.7 |"
    assert lines[4] == "| pass@4, % | 50.0 | 50.0 |"
    with pytest.raises(ValueError, match="different sample counts"):
        score_benchmarks(recs[:-1])


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("name", MATH_SETS)
def test_math_sets_load_with_suffix(name):
    items = load_benchmark(name)
    assert len(items) == SIZES[name]
    assert len({it.item_id for it in items}) == len(items)
    assert all(it.kind == "math" and it.prompt.endswith("\n\n" + MATH_SUFFIX) for it in items)
    assert all(isinstance(it.reference, str) and it.reference.strip() for it in items)
    assert len(load_benchmark(name, limit=3)) == 3


def test_every_math_reference_scores_correct_and_a_wrong_answer_wrong(pool):
    """All 2,836 reference answers, boxed in a sentence, score correct through the same
    path as model responses (checks each set's reference field and its extraction); the
    next problem's answer scores wrong (or is an equal answer), never an error."""
    items = [it for name in MATH_SETS for it in load_benchmark(name)]
    right = [[f"So the final result is $\\boxed{{{it.reference}}}$."] for it in items]
    recs, scores = score_responses(items, right, pool=pool)
    bad = [(r.benchmark, r.item_id, r.reference, r.status, r.detail) for r in recs if not r.correct]
    assert not bad, bad[:5]
    assert all(s.accuracy == 100.0 and s.errors == 0 for s in scores.values())
    sub = items[::25]
    wrong = [[f"\\boxed{{{sub[(i + 1) % len(sub)].reference}}}"] for i in range(len(sub))]
    recs, _ = score_responses(sub, wrong, pool=pool)
    assert not any(r.error for r in recs)
    same = sum(r.correct for r in recs)  # e.g. two gsm8k problems with the same answer
    assert same <= 0.05 * len(recs), [(r.item_id, r.reference, r.extracted) for r in recs if r.correct]


def test_humaneval_canonical_solutions_pass_164(pool):
    """The 164 canonical solutions, written as a chat model would (the whole function in a
    fenced python block after some prose), score 164/164; the prompt alone (a stub) fails."""
    items = load_benchmark("humaneval")
    problems = humaneval_problems()
    assert len(items) == 164 and [it.item_id for it in items] == [p["task_id"] for p in problems]
    assert all(it.kind == "code" and it.prompt.endswith(CODE_SUFFIX) for it in items)
    responses = [[f"Here is the solution.\n\n```python\n{p['prompt']}{p['canonical_solution']}```\n"] for p in problems]
    recs, scores = score_responses(items, responses, pool=pool)
    failed = [(r.item_id, r.status, r.detail) for r in recs if not r.correct]
    assert not failed, failed[:5]
    assert scores["humaneval"].accuracy == 100.0 and scores["humaneval"].errors == 0
    assert all(r.extracted and "def " + it.reference["entry_point"] in r.extracted for r, it in zip(recs, items))
    stub = [[f"```python\n{p['prompt']}    pass\n```"] for p in problems[:8]]
    recs, _ = score_responses(items[:8], stub, pool=pool)
    assert [r.status for r in recs] == ["failed"] * 8 and not any(r.error for r in recs)


def test_verifier_errors_are_counted_not_hidden(pool):
    items = [EvalItem("custom", "bad-tests", "code", "p", {"inputs": [], "outputs": []}),  # malformed
             EvalItem("custom", "no-ref", "math", "p", "   "),  # reference without an answer
             EvalItem("custom", "fine", "math", "p", "4")]
    recs, scores = score_responses(items, [["```python\nprint(1)\n```"], ["\\boxed{4}"], ["\\boxed{4}"]], pool=pool)
    assert [(r.status, r.error, r.correct) for r in recs] == [
        ("sandbox_error", True, False), ("error", True, False), ("correct", False, True)]
    assert scores["custom"].errors == 2 and scores["custom"].accuracy == 100.0  # over the one judged problem
    assert "| verifier errors | 2 | 2 |" in render_table(scores)


def test_one_verdict_policy_by_hand():
    from actors.verifiers.verdict import is_error

    for policy in ("wrong", "error"):
        assert is_error("error", "math", policy) and is_error("sandbox_error", "code", policy)
        assert not is_error("wrong", "math", policy) and not is_error("failed", "code", policy)
        assert not is_error("timeout", "code", policy)  # the program was too slow: a judgement
    assert not is_error("timeout", "math", "wrong") and is_error("timeout", "math", "error")
    with pytest.raises(ValueError):
        is_error("timeout", "math", "drop")


def test_math_timeouts_follow_the_policy_in_benchmark_and_held_out_scoring(pool):
    """A real math timeout (a sympy comparison given 1 ms) is scored by the one policy in
    benchmark evaluation (``score_responses``) and the held-out evaluator (which runs
    ``evaluate``): counted on its own either way; under ``math_timeout=error`` an error, left
    out of the accuracy (never scored 0), under ``wrong`` a wrong answer."""
    from actors.eval.heldout import Evaluator

    slow = EvalItem("custom", "slow", "math", "p", "x^{20} + 20 x^{19} + 190 x^{18}")
    fine = EvalItem("custom", "fine", "math", "p", "4")
    responses = [["\\boxed{(x+1)^{20}}"], ["\\boxed{4}"]]
    limit = {"math": 0.001}
    for policy, errors, accuracy in (("wrong", 0, 50.0), ("error", 1, 100.0)):
        recs, scores = score_responses([slow, fine], responses, pool=pool, timeouts_s=limit, math_timeout=policy)
        assert [r.status for r in recs] == ["timeout", "correct"], [r.detail for r in recs]
        assert [r.error for r in recs] == [policy == "error", False]
        assert scores["custom"].timeouts == 1 and scores["custom"].errors == errors
        assert scores["custom"].accuracy == accuracy  # an error is left out of the accuracy
        assert "| verifier timeouts | 1 | 1 |" in render_table(scores)

    class TimedPool:  # give every math verdict 1 ms, whatever time limit the caller asks for
        kind_timeouts_s = {"math": 5.0, "code": 10.0}

        def submit(self, kind, text, target, timeout_s=None):
            return pool.submit(kind, text, target, limit.get(kind, timeout_s))

    engine = ScriptedEngine({"slow": ["\\boxed{(x+1)^{20}}"], "fine": ["\\boxed{4}"]})
    items = [EvalItem("heldout", "a", "math", "slow", slow.reference), EvalItem("heldout", "b", "math", "fine", "4")]
    for policy, n, errors, accuracy in (("wrong", 2, 0, 0.5), ("error", 1, 1, 1.0)):
        cfg = SimpleNamespace(run=SimpleNamespace(output_dir="unused"), logging=SimpleNamespace(tensorboard=False))
        ev = Evaluator(cfg, engine, TimedPool(), CharTokenizer(), items)
        out = ev._score(samples=1, temperature=1.0, max_tokens=8, seed=0, pool=ev.pool, progress=False,
                        math_timeout=policy, timeouts_s=TimedPool.kind_timeouts_s)
        assert (out["n"], out["errors"], out["timeouts"], out["accuracy"]) == (n, errors, 1, accuracy)


def test_heldout_seeds_are_the_evaluators_historical_streams():
    from actors.eval.heldout import heldout_seeds

    # chunk 0 starts at seed, chunk 1 at seed + 64; within a chunk prompt p is p·samples further
    assert heldout_seeds(100, 130, 4)[:3] == [100, 104, 108]
    assert heldout_seeds(100, 130, 4)[63:66] == [100 + 63 * 4, 164, 168]
    assert heldout_seeds(5, 3, 1) == [5, 6, 7]


# ----------------------------------------------------------------------------- evaluate()
class CharTokenizer:
    """Characters <-> code points; no chat template (to_token_ids encodes the raw text)."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class ScriptedEngine:
    """Answers each prompt with scripted texts keyed by a substring of the prompt."""

    kind = "scripted"
    policy_version = 3

    def __init__(self, script: dict[str, list[str]]):
        self.script = script
        self.calls = []

    def generate(self, prompts, k=1, temperature=1.0, top_p=1.0, max_tokens=256, seed=None):
        self.calls.append((len(prompts), k, temperature, seed))
        out = []
        for p in prompts:
            text = "".join(chr(i) for i in p)
            key = next(key for key in self.script if key in text)
            texts = self.script[key][:k] if k > 1 else self.script[key][:1]
            out.append([Sample([ord(c) for c in t], [-0.1] * len(t), "length" if t.endswith("...") else "stop", 3)
                        for t in texts])
        return out


MATH_ITEMS = [EvalItem("gsm8k", str(i), "math", q + "\n\n" + MATH_SUFFIX, a)
              for i, (q, a) in enumerate([("one plus one", "2"), ("two plus two", "4"), ("three squared", "9")])]


def test_evaluate_greedy_end_to_end(pool, tmp_path):
    engine = ScriptedEngine({"one plus": ["It is \\boxed{2}."], "two plus": ["It is \\boxed{5}."],
                             "three": ["Thinking..."]})
    res = evaluate(engine, MATH_ITEMS, CharTokenizer(), pool=pool, batch_size=2, progress=False, max_tokens=32)
    assert engine.calls == [(2, 1, 0.0, 0), (1, 1, 0.0, 2)]  # chunks of 2 prompts, greedy, seeds offset
    assert [(r.extracted, r.status, r.correct) for r in res.records] == [
        ("2", "correct", True), ("5", "wrong", False), (None, "no_answer", False)]
    s = res.scores["gsm8k"]
    assert s.accuracy == pytest.approx(100 / 3) and s.errors == 0 and s.truncated == 1
    assert res.greedy and res.config["policy_version"] == 3 and res.config["engine"] == "scripted"
    data = json.loads(res.write_json(tmp_path / "out.json").read_text())
    assert data["records"][0]["response"] == "It is \\boxed{2}." and data["records"][0]["reference"] == "2"
    assert data["problems"][1] == {"benchmark": "gsm8k", "item_id": "1", "prompt": MATH_ITEMS[1].prompt,
                                   "reference": "4", "n": 1, "correct": 0, "errors": 0}
    assert data["errors"] == 0 and "| pass@1 (greedy), % | 33.3 | 33.3 |" in data["table"]
    assert set(data["timings"]) >= {"generate_s", "tokens", "tokens_per_s"}


def test_evaluate_samples_avg_and_pass_at_k(pool):
    engine = ScriptedEngine({"one plus": ["\\boxed{2}", "\\boxed{3}", "\\boxed{2}", "\\boxed{1}"],
                             "two plus": ["\\boxed{1}"] * 4, "three": ["\\boxed{9}"] * 4})
    res = evaluate(engine, MATH_ITEMS, CharTokenizer(), pool=pool, samples=4, temperature=0.7, progress=False)
    s = res.scores["gsm8k"]
    assert (s.samples, s.problems) == (4, 3)
    assert s.accuracy == pytest.approx(100 * (0.5 + 0 + 1) / 3)
    assert s.pass_at[4] == pytest.approx(200 / 3)
    assert "| avg@4, % | 50.0 | 50.0 |" in res.table()
    with pytest.raises(ValueError, match="greedy"):
        evaluate(engine, MATH_ITEMS, CharTokenizer(), pool=pool, samples=2, temperature=0.0, progress=False)


def test_system_prompt_and_chat_messages():
    from actors.eval import chat_prompt

    it = MATH_ITEMS[0]
    assert chat_prompt(it) == it.prompt
    assert chat_prompt(it, "sys") == [{"role": "system", "content": "sys"}, {"role": "user", "content": it.prompt}]
    msgs = EvalItem("x", "1", "math", [{"role": "user", "content": "q"}], "1")
    assert chat_prompt(msgs, "sys")[0] == {"role": "system", "content": "sys"}


def test_answer_agreement_and_compare_cli(tmp_path):
    def run(answers):
        return {"records": [{"benchmark": "gsm8k", "item_id": str(i), "sample": 0, "extracted": a,
                             "correct": a == "1", "response": f"\\boxed{{{a}}}"} for i, a in enumerate(answers)]}

    a, b = run(["1", "2", "3", None]), run(["1", "2", "4", None])
    agr = answer_agreement(a, b)
    assert agr["overall"] == {"answers": 0.75, "verdicts": 1.0, "responses": 0.75, "n": 4}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    out = subprocess.run([sys.executable, str(REPO / "launch" / "eval.py"), "--compare", str(pa), str(pb)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| all | 4 | 75.0% | 100.0% | 75.0% |" in out.stdout


def test_unknown_benchmark_is_an_error():
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("nope")
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_benchmark("gsm8k", data_dir="/nonexistent")


# ----------------------------------------------------------------------------- greedy engines
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.synthetic import tiny_qwen2

    d = tmp_path_factory.mktemp("tiny-greedy")
    m = tiny_qwen2(seed=1, vocab=64, hidden=32).eval()
    m.config.eos_token_id = 2
    m.save_pretrained(d)
    return d


PROMPTS = [[1, 10, 11, 12], [1, 20], [1, 30, 31, 32, 33, 34, 35]]


def argmax_continuations(model_dir, prompts, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids, lps = list(p), []
            for _ in range(n):
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
                tok = int(logp.argmax())
                ids.append(tok)
                lps.append(float(logp[tok]))
                if tok == 2:
                    break
            outs.append((ids[len(p):], lps))
    return outs


def test_hf_engine_greedy_is_argmax(tiny_dir):
    from actors.engines import make_engine

    torch.set_num_threads(1)
    eng = make_engine("hf", tiny_dir, seed=0)
    try:
        got = eng.generate(PROMPTS, k=1, temperature=0.0, max_tokens=12, seed=5)
        again = eng.generate(PROMPTS, k=1, temperature=0.0, top_p=0.5, max_tokens=12, seed=6)
        want = argmax_continuations(tiny_dir, PROMPTS, 12)
        for (g,), (a,), (toks, lps) in zip(got, again, want):
            assert g.token_ids == toks == a.token_ids  # top-p and seed are ignored
            assert g.logprobs == pytest.approx(lps, abs=1e-4)  # unscaled (T=1) log-probs
        with pytest.raises(ValueError, match="k == 1"):
            eng.generate(PROMPTS, k=2, temperature=0.0)
        with pytest.raises(ValueError, match="temperature"):
            eng.generate(PROMPTS, k=1, temperature=-0.5)
    finally:
        eng.close()


@pytest.mark.slow
def test_vllm_greedy_equals_hf_greedy(tiny_dir):
    from actors.engines import make_engine

    want = argmax_continuations(tiny_dir, PROMPTS, 16)
    eng = make_engine("vllm", tiny_dir, max_model_len=128, seed=0)
    try:
        got = eng.generate(PROMPTS, k=1, temperature=0.0, top_p=0.9, max_tokens=16)
    finally:
        eng.close()
    for (g,), (toks, lps) in zip(got, want):
        assert g.token_ids == toks
        assert g.logprobs == pytest.approx(lps, abs=1e-4)


@pytest.mark.slow
def test_launch_eval_smollm2_hf(tmp_path):
    from actors.prepare_model import prepare_model

    model = prepare_model("smollm2-135m-instruct")
    out = tmp_path / "smol.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "eval.py"), "--model", str(model), "--benchmarks", "gsm8k,humaneval",
         "--limit", "2", "--engine", "hf", "--max-tokens", "48", "--output", str(out), "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| metric | GSM8K | HumanEval | Avg. |" in proc.stdout
    data = json.loads(out.read_text())
    assert len(data["records"]) == 4 and data["config"]["temperature"] == 0.0
    assert all(r["num_tokens"] > 0 and r["status"] for r in data["records"])
