"""Where do PRIME's implicit process rewards land? A diagnosis on the embedded arithmetic task.

    .venv/bin/python benchmarks/credit.py RUN_DIR [--policy DIR] [--prm DIR] [--limit 256]
        [--samples 4] [--json FILE]

From a finished run of the embedded task (``task.kind: arithmetic``): responses are sampled
from the policy (default ``RUN_DIR/final``; ``--policy RUN_DIR/sft`` for the starting one)
on the held-out prompts at the training temperature, K = ``--samples`` per prompt; each is
classified by the task itself (``actors.tasks.arithmetic.diagnose``: correct, slip = exactly
one step's result off by 1..max_slip, arith, copy, format). The implicit PRM
(``RUN_DIR/final_prm``, the PRM the run trained) and the reference (``model.ref_path`` or the
run's starting policy) give every response token its process reward q_t = log π_φ − log π_ref
(temperature 1, as the PRM is trained). Printed:

- the PRM's accuracy on these responses (β Σ_t q_t > 0 iff correct) and mean β Σ q per class;
- localisation, on the slip responses, whose slipped step the task knows: mean q on the
  tokens before the slipped step, on its result tokens, on its other tokens, and after it;
  the share of slip responses whose lowest-q token is one of the slipped result's tokens,
  against chance (that result's share of the response's tokens);
- scale: the mean |process term| against the mean |outcome term| of the RLOO returns the
  learner would compute for these groups (``learner.prime.rloo_returns`` with the run's
  ``prime_norm`` and ``process_baseline``), per token; and on the slip responses, each term
  of the returns (outcome, process in sum form, process in PURE's min form) averaged over
  the tokens before the slipped step, of the slipped step, and after it;
- a last line ``localisation: argmin-q in the slipped result X% (chance Y%)``.

Not covered: other tasks (there is no step structure to locate), PRMs other than the
implicit one, vLLM sampling (the transformers engine is used).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

import torch  # noqa: E402

from actors.tasks.arithmetic import OPS, Problem, _apply, diagnose  # noqa: E402


def parse_problem(prompt: str, width: int) -> Problem:
    """The problem of a prompt text ("1 7 + 2 5 - 8 * 3": digits split by spaces)."""
    words, numbers, ops, cur = prompt.split(), [], [], []
    for w in words + ["+"]:
        if w in OPS:
            numbers.append(int("".join(cur)))
            ops.append(w)
            cur = []
        else:
            cur.append(w)
    return Problem(start=numbers[0], ops=tuple(zip(ops[:-1], numbers[1:])), width=width)


def step_layout(words: list[str]) -> list[tuple[int, int, int]]:
    """Per step of a response's words: (first word, first result word, end) indices; a step
    is ``a op x = r`` closed by ``;``."""
    out, start, eq = [], 0, None
    for i, w in enumerate(words):
        if w == "=":
            eq = i + 1
        elif w == ";":
            if eq is not None:
                out.append((start, eq, i))
            start, eq = i + 1, None
    return out


def slipped_step(problem: Problem, words: list[str]) -> int | None:
    """Index of the one step whose written result is wrong (for a response diagnosed as a slip)."""
    prev, bad = problem.start, []
    for k, (s, e, end) in enumerate(step_layout(words)):
        if k >= len(problem.ops):
            break
        op, x = problem.ops[k]
        r = int("".join(words[e:end]))
        if r != _apply(prev, op, x):
            bad.append(k)
        prev = r
    return bad[0] if len(bad) == 1 else None


def token_logprobs_of(model, prompt_ids: list[int], resp_ids: list[int]) -> torch.Tensor:
    from learner.logprobs import token_logprobs

    ids = torch.tensor([prompt_ids + resp_ids])
    with torch.no_grad():
        lp = token_logprobs(model, ids, torch.ones_like(ids), 1.0)
    return lp[0, len(prompt_ids) - 1:]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--policy", help="model to sample from (default RUN_DIR/final)")
    ap.add_argument("--prm", help="implicit PRM (default RUN_DIR/final_prm)")
    ap.add_argument("--limit", type=int, default=256, help="held-out prompts")
    ap.add_argument("--samples", type=int, default=4, help="responses per prompt (K)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.engines import make_engine
    from actors.prompts import to_token_ids
    from common.config import load_config
    from learner.prime import grpo_returns, reinforce_returns, rloo_returns

    run = Path(args.run_dir)
    cfg = load_config(run / "config.yaml")
    if cfg.task.kind != "arithmetic":
        raise SystemExit(f"{run}: task.kind is {cfg.task.kind!r}; this diagnosis needs the arithmetic task")
    torch.manual_seed(args.seed)
    policy_dir = args.policy or str(run / "final")
    prm_dir = args.prm or str(run / "final_prm")
    ref_dir = cfg.model.ref_path or cfg.model.policy_path
    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.policy_path)
    prm = AutoModelForCausalLM.from_pretrained(prm_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    engine = make_engine("hf", policy_dir, device="cpu", seed=args.seed)
    rows = [json.loads(x) for x in Path(cfg.eval.heldout_path).read_text().splitlines() if x.strip()][: args.limit]
    width = cfg.task.digits if cfg.task.fixed_width else 0
    K, beta = args.samples, cfg.prime.beta
    prompts = [to_token_ids(r["prompt"], tok) for r in rows]
    groups = engine.generate(prompts, k=K, temperature=cfg.generation.temperature, top_p=1.0,
                             max_tokens=cfg.generation.max_tokens, seed=[args.seed * 100_003 + i for i in range(len(rows))])
    engine.close()

    classes: dict[str, list[float]] = {}
    correct_pred, n = 0, 0
    where = {"before": [], "result": [], "step_rest": [], "after": []}
    hits, chance, spans = [], [], []  # spans: (row, slipped step's first word, its result, its end)
    q_rows, outcomes = [], []
    eos = set(tok.convert_tokens_to_ids(["<eos>"]))
    for row, p_ids, group in zip(rows, prompts, groups):
        problem = parse_problem(row["prompt"], width)
        for s in group:
            resp = list(s.token_ids)
            q = (token_logprobs_of(prm, p_ids, resp) - token_logprobs_of(ref, p_ids, resp)).double()
            words = [w for w in tok.convert_ids_to_tokens(resp)]
            text = " ".join(w for w, t in zip(words, resp) if t not in eos)
            kind = diagnose(problem, text)
            ok = kind == "correct"
            score = beta * float(q.sum())
            classes.setdefault(kind, []).append(score)
            correct_pred += (score > 0) == ok
            n += 1
            q_rows.append(q)
            outcomes.append(float(ok))
            k = slipped_step(problem, words) if kind == "slip" else None
            if k is None:
                continue
            s0, e0, end = step_layout(words)[k]
            spans.append((len(q_rows) - 1, s0, e0, end))
            qs = q.tolist()
            where["before"] += qs[:s0]
            where["step_rest"] += qs[s0:e0]
            where["result"] += qs[e0:end]
            where["after"] += qs[end:]
            hits.append(e0 <= int(q.argmin()) < end)
            chance.append((end - e0) / len(qs))

    T = max(len(q) for q in q_rows)
    qpad = torch.zeros(len(q_rows), T, dtype=torch.float64)
    mask = torch.zeros(len(q_rows), T, dtype=torch.float64)
    for i, q in enumerate(q_rows):
        qpad[i, : len(q)], mask[i, : len(q)] = q, 1.0
    o = torch.tensor(outcomes, dtype=torch.float64)
    kw = dict(prime_norm=cfg.prime.prime_norm)
    estimators = {
        "rloo": lambda r: rloo_returns(r, o, mask, K, process_baseline=cfg.prime.process_baseline, **kw),
        "grpo": lambda r: grpo_returns(r, o, mask, K, **kw),
        "reinforce": lambda r: reinforce_returns(r, o, mask, **kw),
    }
    # per estimator: (outcome-only returns, process term = full returns - outcome-only)
    terms = {name: (fn(None), fn(qpad * beta)) for name, fn in estimators.items()}
    terms = {name: (oo, full - oo) for name, (oo, full) in terms.items()}
    outcome_only, process_part = terms["rloo"]
    on = mask > 0

    def by_region(x: torch.Tensor) -> dict:
        """Mean of a [B, T] return over the slip responses' regions."""
        acc = {"before": [], "slipped_step": [], "after": []}
        for i, s0, e0, end in spans:
            acc["before"] += x[i, :s0].tolist()
            acc["slipped_step"] += x[i, s0:end].tolist()
            acc["after"] += x[i, end: len(q_rows[i])].tolist()
        return {k: (statistics.fmean(v) if v else None) for k, v in acc.items()}

    min_part = rloo_returns(qpad * beta, o, mask, K, process_baseline=cfg.prime.process_baseline,
                            process_credit="min", **kw) - outcome_only
    mixed = o.view(-1, K).std(-1) > 0  # groups the accuracy filter would keep (0 < mean < 1)
    rows_mixed = mixed.repeat_interleave(K)
    sel = on & rows_mixed[:, None]
    scale = {name: float(pp[sel].abs().mean() / oo[sel].abs().mean().clamp_min(1e-12)) if sel.any() else None
             for name, (oo, pp) in terms.items()}
    out = {
        "responses": n, "prm_accuracy": correct_pred / n,
        "process_to_outcome_by_estimator": scale, "mixed_groups": int(mixed.sum()),
        "classes": {c: {"n": len(v), "mean_beta_sum_q": statistics.fmean(v)} for c, v in sorted(classes.items())},
        "slip_q_mean": {k: (statistics.fmean(v) if v else None) for k, v in where.items()},
        "slip_argmin_in_result": statistics.fmean(hits) if hits else None,
        "slip_argmin_chance": statistics.fmean(chance) if chance else None,
        "slips_located": len(hits),
        "outcome_term_abs_mean": float(outcome_only[on].abs().mean()),
        "process_term_abs_mean": float(process_part[on].abs().mean()),
        "slip_outcome_term": by_region(outcome_only), "slip_process_term_sum": by_region(process_part),
        "slip_process_term_min": by_region(min_part),
        "policy": policy_dir, "prm": prm_dir, "ref": ref_dir,
    }
    print(f"{n} responses from {policy_dir} (K={K}); PRM {prm_dir} vs reference {ref_dir}")
    print(f"PRM accuracy (β Σ q > 0 iff correct): {out['prm_accuracy']:.3f}")
    for c, v in out["classes"].items():
        print(f"  {c:8s} n={v['n']:5d}  mean β Σ q = {v['mean_beta_sum_q']:+.4f}")
    print("slip responses, mean q per token: " + ", ".join(
        f"{k} {v:+.4f}" if v is not None else f"{k} -" for k, v in out["slip_q_mean"].items()))
    print(f"RLOO returns per token: |outcome term| {out['outcome_term_abs_mean']:.4f}, "
          f"|process term| {out['process_term_abs_mean']:.4f} "
          f"(ratio {out['process_term_abs_mean'] / max(out['outcome_term_abs_mean'], 1e-12):.3f})")
    print(f"|process term| / |outcome term| of the returns on the {out['mixed_groups']} groups with mixed outcomes: "
          + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in scale.items()))
    for key, label in (("slip_outcome_term", "outcome term"), ("slip_process_term_sum", "process term (sum form)"),
                       ("slip_process_term_min", "process term (min form)")):
        print(f"slip responses, {label} of the returns: " + ", ".join(
            f"{k} {v:+.4f}" if v is not None else f"{k} -" for k, v in out[key].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if hits:
        print(f"localisation: argmin-q in the slipped result {100 * out['slip_argmin_in_result']:.1f}% "
              f"(chance {100 * out['slip_argmin_chance']:.1f}%, {len(hits)} slips)")
    else:
        print("localisation: no slip responses to locate")
    return out


if __name__ == "__main__":
    main()
