"""Generation engines (actors/engines): behaviour log-probs equal the learner's recomputation
(``learner.logprobs.token_logprobs``, transformers fp32) before and after an in-place weight
update, for vLLM (the CPU build here) and transformers, on a tiny random Qwen2 with tied
embeddings, one without, and SmolLM2-135M-Instruct (prepared from its GGUF).

One engine per (backend, model) case, module-scoped: pytest runs every test of a case
before starting the next case's engine. The ``Case`` object tracks which weights the
engine holds, so later tests of a case compare against the right reference model.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from actors.engines import Engine, Sample, make_engine
from learner.logprobs import token_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TINY_VOCAB, EOS = 128, 2
TINY_PROMPTS = [[1, 10, 11, 12], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36], [1, 40]]
SMOL_QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2+3?"]
MEAN_ABS_TOL = 1e-3


@dataclass
class Case:
    kind: str
    model: str
    temperature: float
    noise: float  # std of the Gaussian added to every parameter for an update
    max_tokens: int
    engine: Engine
    reference: torch.nn.Module  # what the engine holds now, as a transformers model
    prompts: list[list[int]]
    tmp: Path
    notes: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def tiny_qwen2(path: Path, tied: bool, seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=EOS,
    )
    model = Qwen2ForCausalLM(cfg).float().eval()
    model.save_pretrained(path)
    return model


def perturbed(model: torch.nn.Module, std: float, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with N(0, std²) noise added to every parameter (tied ones once)."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return new


def batch(prompts: list[list[int]], groups: list[list[Sample]]):
    """Right-padded ids/mask of every prompt+response, the [B, L-1] response mask and the
    engine's log-probs aligned to it."""
    rows = [(p, s) for p, ss in zip(prompts, groups) for s in ss]
    width = max(len(p) + len(s.token_ids) for p, s in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros(len(rows), width - 1)
    engine_lp = torch.zeros(len(rows), width - 1)
    for i, (p, s) in enumerate(rows):
        n = len(p) + len(s.token_ids)
        ids[i, :n] = torch.tensor(p + s.token_ids)
        attn[i, :n] = 1
        mask[i, len(p) - 1:n - 1] = 1
        engine_lp[i, len(p) - 1:n - 1] = torch.tensor(s.logprobs)
    return ids, attn, mask, engine_lp


def mean_abs_diff(model: torch.nn.Module, prompts, groups, temperature: float) -> float:
    """Mean over response tokens of |engine log-prob - learner log-prob|."""
    ids, attn, mask, engine_lp = batch(prompts, groups)
    with torch.no_grad():
        learner = token_logprobs(model, ids, attn, temperature)
    return float(((learner - engine_lp).abs() * mask).sum() / mask.sum())


def nucleus_logprobs(model: torch.nn.Module, ids, attn, temperature: float, top_p: float) -> torch.Tensor:
    """Learner-side log-probs under the top-p nucleus, renormalised: keep the most likely
    tokens until their mass reaches ``top_p`` (dropping those whose ascending cumulative
    mass is <= 1 - top_p), log_softmax over them; -inf outside."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
    sorted_logits, order = logits.sort(dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum <= 1 - top_p
    drop[..., -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def check_shape_and_finish(groups: list[list[Sample]], n_prompts: int, k: int, max_tokens: int,
                           eos: set[int], version: int) -> None:
    assert len(groups) == n_prompts and all(len(g) == k for g in groups)
    for s in (s for g in groups for s in g):
        assert len(s.token_ids) == len(s.logprobs) >= 1
        assert s.policy_version == version
        assert all(lp <= 1e-6 for lp in s.logprobs)
        assert not eos & set(s.token_ids[:-1]), "generation continued past an end-of-sequence id"
        if s.finish_reason == "stop":
            assert s.token_ids[-1] in eos
        else:
            assert s.finish_reason == "length" and len(s.token_ids) == max_tokens
            assert s.token_ids[-1] not in eos


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from actors.prepare_model import prepare_model

    return prepare_model("smollm2-135m-instruct")


CASES = [
    ("vllm", "tiny-tied", 0.7),
    ("vllm", "tiny-untied", 1.0),
    ("hf", "tiny-tied", 0.7),
    ("hf", "tiny-untied", 1.0),
    ("hf", "smollm2", 0.8),
    pytest.param(("vllm", "smollm2", 0.8), marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}-T{c[2]}")
def case(request, tmp_path_factory) -> Case:
    kind, model_name, temperature = request.param
    tmp = tmp_path_factory.mktemp(f"{kind}-{model_name}")
    if model_name.startswith("tiny"):
        reference = tiny_qwen2(tmp / "model", tied=model_name == "tiny-tied")
        model_dir, prompts, noise, max_tokens, max_len = tmp / "model", TINY_PROMPTS, 0.02, 24, 256
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = request.getfixturevalue("smollm2_dir")
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)) for q in SMOL_QUESTIONS]
        noise, max_tokens, max_len = 0.01, 24, 512
    t0 = time.perf_counter()
    engine = make_engine(kind, model_dir, max_model_len=max_len, seed=0)
    c = Case(kind, model_name, temperature, noise, max_tokens, engine, reference, prompts, tmp)
    c.notes["startup_s"] = round(time.perf_counter() - t0, 1)
    yield c
    engine.close()
    print(f"\n[{kind}/{model_name}] {c.notes}")


# ----------------------------------------------------------------------------- tests
def test_logprobs_match_learner_before_and_after_weight_update(case: Case):
    eos = set(case.engine.eos_token_ids)
    k, T = 3, case.temperature
    before = case.engine.generate(case.prompts, k=k, temperature=T, max_tokens=case.max_tokens, seed=1)
    check_shape_and_finish(before, len(case.prompts), k, case.max_tokens, eos, version=0)
    diff_before = mean_abs_diff(case.reference, case.prompts, before, T)
    assert diff_before < MEAN_ABS_TOL, f"before update: mean |Δ| = {diff_before:.2e}"

    old = case.reference
    new = perturbed(old, case.noise, seed=7)
    t0 = time.perf_counter()
    case.engine.load_weights(new.state_dict(), version=1)
    load_s = time.perf_counter() - t0
    case.reference = new
    assert case.engine.policy_version == 1

    after = case.engine.generate(case.prompts, k=k, temperature=T, max_tokens=case.max_tokens, seed=1)
    check_shape_and_finish(after, len(case.prompts), k, case.max_tokens, eos, version=1)
    diff_after = mean_abs_diff(new, case.prompts, after, T)
    assert diff_after < MEAN_ABS_TOL, f"after update: mean |Δ| = {diff_after:.2e}"
    # the update really landed: the same tokens score differently under the old weights
    stale = mean_abs_diff(old, case.prompts, after, T)
    assert stale > 20 * MEAN_ABS_TOL, f"engine log-probs look like the old weights' (Δ vs old = {stale:.2e})"
    case.notes.update(diff_before=f"{diff_before:.1e}", diff_after=f"{diff_after:.1e}",
                      diff_vs_old_weights=f"{stale:.2f}", load_s=round(load_s, 2))


def test_top_p_logprobs_are_of_the_renormalised_nucleus(case: Case):
    """Weights from a directory this time; then top-p: the engine reports log-probs of the
    truncated, renormalised distribution (>= the temperature-only ones), matching the
    learner-side nucleus computation."""
    new = perturbed(case.reference, case.noise, seed=8)
    new.save_pretrained(case.tmp / "update-2")
    version = case.engine.policy_version + 1
    case.engine.load_weights(case.tmp / "update-2", version=version)
    case.reference = new
    with pytest.raises(ValueError):
        case.engine.load_weights(case.tmp / "update-2", version=version - 1)
    case.engine.allow_rewind()  # a restarted learner re-publishes an older version: taken once
    assert case.engine.rewinding
    case.engine.load_weights(case.tmp / "update-2", version=version - 1)
    assert case.engine.policy_version == version - 1 and not case.engine.rewinding
    with pytest.raises(ValueError):
        case.engine.load_weights(case.tmp / "update-2", version=version - 2)
    case.engine.load_weights(case.tmp / "update-2", version=version)

    T, top_p = case.temperature, 0.8
    groups = case.engine.generate(case.prompts, k=3, temperature=T, top_p=top_p, max_tokens=case.max_tokens, seed=2)
    check_shape_and_finish(groups, len(case.prompts), 3, case.max_tokens, set(case.engine.eos_token_ids), version)
    ids, attn, mask, engine_lp = batch(case.prompts, groups)
    nucleus = nucleus_logprobs(new, ids, attn, T, top_p)
    with torch.no_grad():
        plain = token_logprobs(new, ids, attn, T)
    on = mask.bool()
    assert torch.isfinite(nucleus[on]).all(), "a sampled token lies outside the learner's nucleus"
    diff = float((nucleus - engine_lp)[on].abs().mean())
    gap = float((engine_lp - plain)[on].mean())
    assert diff < MEAN_ABS_TOL, f"top-p: mean |Δ| vs nucleus log-probs = {diff:.2e}"
    assert bool(((engine_lp - plain)[on] >= -1e-4).all()) and gap > 1e-3, f"mean renormalisation gap {gap:.2e}"
    case.notes.update(top_p_diff=f"{diff:.1e}", top_p_gap=f"{gap:.3f}")


def test_a_prompts_samples_do_not_depend_on_its_batch(case: Case):
    """Per-prompt seeds (what the actor passes): prompt b's samples are the same alone, after
    another prompt, or before it; an int seed gives the same call twice."""
    a, b = case.prompts[0], case.prompts[1]
    T, n = case.temperature, case.max_tokens
    pair = case.engine.generate([a, b], k=3, temperature=T, max_tokens=n, seed=[101, 202])
    alone = case.engine.generate([b], k=3, temperature=T, max_tokens=n, seed=[202])
    swapped = case.engine.generate([b, a], k=3, temperature=T, max_tokens=n, seed=[202, 101])
    tokens = [[s.token_ids for s in per] for per in (pair[1], alone[0], swapped[0])]
    assert tokens[0] == tokens[1] == tokens[2], tokens
    assert [s.token_ids for s in pair[0]] == [s.token_ids for s in swapped[1]]
    assert len({tuple(t) for t in tokens[0]}) > 1, "the k samples of a prompt share a stream"
    other = case.engine.generate([b], k=3, temperature=T, max_tokens=n, seed=[203])
    assert [s.token_ids for s in other[0]] != tokens[1], "the seed does not reach the sampler"
    with pytest.raises(ValueError):
        case.engine.generate([a, b], k=3, temperature=T, max_tokens=n, seed=[1])


def test_sampled_first_tokens_follow_the_reported_distribution(case: Case):
    """2,000 samples of one prompt's first token: each token's frequency is within 4.5 σ of
    exp(its reported log-prob), and the tokens seen carry ≥ 97% of the probability mass."""
    if case.kind != "hf" or case.model != "tiny-untied":
        pytest.skip("the row sampler is the transformers engine's; one case suffices")
    n = 2000
    out = case.engine.generate([case.prompts[0]], k=n, temperature=case.temperature, max_tokens=1, seed=5)[0]
    counts, prob = {}, {}
    for s in out:
        t = s.token_ids[0]
        counts[t] = counts.get(t, 0) + 1
        prob[t] = math.exp(s.logprobs[0])
    for t, c in counts.items():
        p = prob[t]
        assert abs(c / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-3, (t, c / n, p)
    assert sum(prob.values()) >= 0.97, sum(prob.values())


def test_generation_throughput(case: Case):
    """32 prompts x 4 samples x up to 64 tokens on the tiny tied model (its engine is already
    up, so this costs seconds); reports tokens/s in the case's notes (``pytest -s``)."""
    if case.model != "tiny-tied":
        pytest.skip("throughput is measured on the tiny tied model only")
    prompts = [[1] + [3 + (i * 7 + j) % (TINY_VOCAB - 3) for j in range(8)] for i in range(32)]
    case.engine.generate(prompts[:2], k=2, max_tokens=8, seed=0)  # warm-up
    t0 = time.perf_counter()
    groups = case.engine.generate(prompts, k=4, temperature=1.0, max_tokens=64, seed=3)
    dt = time.perf_counter() - t0
    tokens = sum(len(s.token_ids) for g in groups for s in g)
    case.notes.update(tokens=tokens, gen_s=round(dt, 2), tokens_per_s=round(tokens / dt))
    assert tokens >= 32 * 4
