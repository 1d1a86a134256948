"""The embedded arithmetic task and its supervised warm-up: seeded, disjoint splits, slips
where the docstring says, the real verifier on decoded text, the word-level tokenizer and
chat template, the warm-up's pure pieces, its sampler, its cache and its model directory."""

import json
import time
from pathlib import Path

import pytest
import torch

from actors.prompts import PromptSource, split_reference, to_token_ids
from actors.tasks import arithmetic as ar
from actors.tasks import warmup as wu
from actors.verifiers.math_verifier import verify_math
from common.config import PrimeRunConfig, TaskConfig, WarmupConfig

SIZES = {"heldout": 200, "dev": 100, "train": 500, "sft": 2000}


@pytest.fixture(scope="module")
def tok():
    return ar.build_tokenizer()


@pytest.fixture(scope="module")
def splits():
    return ar.make_splits(0, 3, 2, SIZES, fixed_width=True)


def _decoded(tok, text):
    """What a model's response decodes to: tokens -> ids -> text (special tokens skipped)."""
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return tok.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- problems


def test_splits_are_deterministic_by_seed(splits):
    again = ar.make_splits(0, 3, 2, SIZES, fixed_width=True)
    assert again == splits
    other = ar.make_splits(1, 3, 2, SIZES, fixed_width=True)
    assert [p.key for p in other["heldout"]] != [p.key for p in splits["heldout"]]
    # the held-out set does not depend on the sizes of the later splits
    small = ar.make_splits(0, 3, 2, {"heldout": 200, "sft": 10}, fixed_width=True)
    assert small["heldout"] == splits["heldout"]


def test_splits_are_disjoint_by_canonical_key(splits):
    keys = {name: {p.key for p in ps} for name, ps in splits.items()}
    for name, ps in splits.items():
        assert len(keys[name]) == len(ps) == SIZES[name]  # unique within a split
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not keys[a] & keys[b], (a, b)
    # the key ignores the rendering: padded and unpadded spellings are the same problem
    p = splits["heldout"][0]
    assert ar.Problem(p.start, p.ops, 0).key == p.key


def test_problems_stay_in_range(splits):
    for p in splits["sft"]:
        assert 0 <= p.start <= 99 and len(p.ops) == 3
        for op, x in p.ops:
            assert (2 <= x <= 9) if op == "*" else (1 <= x <= 99)
        assert all(0 <= v <= 99 for v in p.values())


def test_rendering():
    p = ar.Problem(17, (("+", 25), ("-", 8), ("*", 2)), 2)
    assert p.prompt == "1 7 + 2 5 - 0 8 * 0 2"
    assert p.answer == 68
    assert ar.render_solution(p) == "1 7 + 2 5 = 4 2 ; 4 2 - 0 8 = 3 4 ; 3 4 * 0 2 = 6 8 ; \\boxed{ 6 8 }"
    slipped = ar.render_solution(p, ar.Slip(1, -2))
    assert slipped == "1 7 + 2 5 = 4 2 ; 4 2 - 0 8 = 3 2 ; 3 2 * 0 2 = 6 4 ; \\boxed{ 6 4 }"
    q = ar.Problem(17, (("+", 25), ("-", 8)), 0)
    assert q.prompt == "1 7 + 2 5 - 8" and ar.render_solution(q).endswith("4 2 - 8 = 3 4 ; \\boxed{ 3 4 }")


def test_slip_share_and_slip_shape(splits):
    demos = ar.demonstrations(splits["sft"], 0.3, 3, 2, seed=0)
    slipped = [d for d in demos if d.slip is not None]
    assert len(slipped) == round(0.3 * len(demos))
    assert ar.demonstrations(splits["sft"], 0.3, 3, 2, seed=0) == demos
    steps = {d.slip.step for d in slipped}
    assert steps == {0, 1, 2}
    for d in demos:
        if d.slip is None:
            assert ar.diagnose(d.problem, d.response) == "correct"
            continue
        assert 1 <= abs(d.slip.delta) <= 3
        values = d.problem.values(d.slip)
        assert values[-1] != d.problem.answer and all(0 <= v <= 99 for v in values)
        assert ar.diagnose(d.problem, d.response) == "slip"
    assert not any(d.slip for d in ar.demonstrations(splits["sft"], 0.0, 3, 2, seed=0))


def test_verifier_scores_decoded_demonstrations(splits, tok):
    demos = ar.demonstrations(splits["sft"][:200], 0.5, 3, 2, seed=3)
    for d in demos:
        text = _decoded(tok, d.response)
        assert text == d.response  # decoding joins word tokens with single spaces
        verdict = verify_math(text, str(d.problem.answer))
        assert verdict.status == ("wrong" if d.slip else "correct"), (text, verdict)


def test_diagnose_kinds():
    p = ar.Problem(17, (("+", 25), ("-", 8), ("*", 2)), 2)
    assert ar.diagnose(p, "1 7 + 2 5 = 4 2 ; 4 2 - 0 8 = 3 4 ; 3 4 * 0 2 = 6 8 ; \\boxed{ 6 8 }") == "correct"
    assert ar.diagnose(p, "1 7 + 2 5 = 4 3 ; 4 3 - 0 8 = 3 5 ; 3 5 * 0 2 = 7 0 ; \\boxed{ 7 0 }") == "slip"
    assert ar.diagnose(p, "1 7 + 2 5 = 5 2 ; 5 2 - 0 8 = 4 4 ; 4 4 * 0 2 = 8 8 ; \\boxed{ 8 8 }") == "arith"
    assert ar.diagnose(p, "1 7 + 2 5 = 4 2 ; 4 3 - 0 8 = 3 5 ; 3 5 * 0 2 = 7 0 ; \\boxed{ 7 0 }") == "copy"
    assert ar.diagnose(p, "1 7 + 2 5 = 4 2 ; \\boxed{ 4 2 }") == "format"
    assert ar.diagnose(p, "") == "format"


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_chat_template(tok, tmp_path):
    from transformers import AutoTokenizer

    assert len(tok) == len(ar.VOCAB) == 22
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    text = "1 7 + 2 5 = 4 2 ; \\boxed{ 4 2 }"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == len(text.split())
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = to_token_ids("1 7 + 2 5", loaded)
    assert loaded.convert_ids_to_tokens(ids) == ["<bos>", "1", "7", "+", "2", "5", "<sep>"]
    assert ids == to_token_ids([{"role": "user", "content": "1 7 + 2 5"}], tok)


def test_prompt_files_read_by_prompt_source(splits, tmp_path):
    paths = ar.write_prompt_files(tmp_path, splits, names=("train", "heldout"))
    src = PromptSource(paths["heldout"])
    items = list(src)
    assert len(items) == SIZES["heldout"]
    pid, prompt, ref = items[0]
    kind, value = split_reference(ref)
    p = splits["heldout"][0]
    assert (pid, prompt, kind, value) == ("arith-heldout-000000", p.prompt, "math", str(p.answer))
    train_prompts = {r["prompt"] for r in ar.load_rows(paths["train"])}
    assert not train_prompts & {r["prompt"] for r in ar.load_rows(paths["heldout"])}


# ----------------------------------------------------------------------------- warm-up pieces


def test_collate_masks_response_tokens_only():
    ids, attn, mask = wu.collate([([1, 5, 6, 3, 7, 8, 2], 4), ([1, 5, 3, 9, 2], 3)], pad_id=0)
    assert ids.tolist() == [[1, 5, 6, 3, 7, 8, 2], [1, 5, 3, 9, 2, 0, 0]]
    assert attn.tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    # position t predicts token t+1: the response tokens are 7 8 2 and 9 2
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    with pytest.raises(ValueError):
        wu.collate([([1, 2], 2)], pad_id=0)


def test_response_ce_loss_matches_a_loop():
    torch.manual_seed(0)
    ids, _, mask = wu.collate([([1, 5, 6, 3, 7, 8, 2], 4), ([1, 5, 3, 9, 2], 3)], pad_id=0)
    logits = torch.randn(2, ids.shape[1], 22)
    got = wu.response_ce_loss(logits, ids, mask)
    terms = [-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
             for b in range(2) for t in range(ids.shape[1] - 1) if mask[b, t]]
    assert torch.allclose(got, torch.stack(terms).mean())
    # padding beyond the masks changes nothing
    longer = torch.cat([logits, torch.randn(2, 3, 22)], 1)
    ids2 = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    mask2 = torch.cat([mask, torch.zeros(2, 3)], 1)
    assert torch.allclose(wu.response_ce_loss(longer, ids2, mask2), got)


def test_plateau_tracker_rule():
    t = wu.PlateauTracker(patience=2, min_delta=0.01)
    assert t.update(0.10, 0.20) and not t.plateaued
    assert t.update(0.105, 0.30)  # greedy improved
    assert not t.update(0.11, 0.305)  # neither beat its best by more than 0.01
    assert not t.plateaued
    assert not t.update(0.109, 0.30) and t.plateaued
    assert t.update(0.2, 0.0) and not t.plateaued  # an improvement resets the count


def test_lr_factor():
    assert wu.lr_factor(0, 10) == pytest.approx(0.1)
    assert wu.lr_factor(9, 10) == wu.lr_factor(500, 10) == 1.0
    assert wu.lr_factor(600, 10, cooldown_start=500, cooldown_steps=200) == pytest.approx(0.5)
    assert wu.lr_factor(700, 10, cooldown_start=500, cooldown_steps=200) == 0.0


def test_sampler_greedy_is_padding_invariant(tok, splits):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval()
    prompts = [to_token_ids(p.prompt, tok) for p in splits["dev"][:6]]
    prompts[0] = prompts[0][:4]  # unequal lengths -> left padding in the batch
    batch = wu.sample(model, prompts, 1, 0.0, 12, tok.eos_token_id, tok.pad_token_id, seed=0)
    for p, got in zip(prompts, batch):
        alone = wu.sample(model, [p], 1, 0.0, 12, tok.eos_token_id, tok.pad_token_id, seed=0)[0]
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert got == alone
        got = got[0]  # k = 1
        assert got == ref[: len(got)] and (got[-1] == tok.eos_token_id or len(got) == 12)
    drawn = wu.sample(model, prompts, 3, 1.0, 12, tok.eos_token_id, tok.pad_token_id, seed=5)
    assert drawn == wu.sample(model, prompts, 3, 1.0, 12, tok.eos_token_id, tok.pad_token_id, seed=5)
    assert [len(g) for g in drawn] == [3] * 6


# ----------------------------------------------------------------------------- warm-up


def _tiny(tmp_path):
    task = TaskConfig(sft_size=64, train_size=16, dev_size=4, heldout_size=4)
    warm = WarmupConfig(hidden_size=64, intermediate_size=64, layers=1, heads=2, batch_size=8, max_steps=4,
                        eval_every=2, cooldown_steps=2, lr_warmup_steps=1, eval_samples=2, max_new_tokens=8,
                        cache_dir=str(tmp_path / "cache"))
    return task, warm


def test_warmup_trains_caches_and_saves_a_model_dir(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task, warm = _tiny(tmp_path)
    first = wu.warmup(tmp_path / "sft", task, warm)
    assert not first["cached"] and first["steps"] == 4 and first["stop_reason"] == "max_steps"
    assert [p["step"] for p in first["eval_curve"]] == [2, 4]
    assert first["eval_curve"][-1]["phase"] == "cooldown" and first["eval_curve"][-1]["lr"] < warm.lr
    assert first["slip_share"] == pytest.approx(0.3, abs=0.01)
    assert first["demo_accuracy"] == pytest.approx(1 - first["slip_share"])
    assert 0.0 <= first["heldout_sampled"] <= 1.0 and 0.0 <= first["heldout_greedy"] <= 1.0
    model_dir = Path(first["model_dir"])
    assert json.loads((model_dir / "warmup.json").read_text())["key"] == wu.cache_key(task, warm)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tok) and model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert len(PromptSource(first["prompt_files"]["heldout"])) == 4

    t0 = time.perf_counter()
    second = wu.warmup(tmp_path / "sft2", task, warm)
    assert time.perf_counter() - t0 < 1.0
    assert second["cached"] and second["key"] == first["key"]
    assert (Path(second["model_dir"]) / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    # another recipe is another entry
    assert wu.cache_key(task, warm.model_copy(update={"lr": 1e-3})) != first["key"]
    assert wu.cache_key(task, warm.model_copy(update={"threads": 1, "cache_dir": "/x"})) == first["key"]


def test_shipped_warmup_ship_install_tamper_and_rebuild(tmp_path, monkeypatch):
    """actors/tasks/shipped.py on a tiny recipe: ship it, install it into an empty cache
    (no training; prompt files regenerated identical), refuse altered or extra files, and a
    rebuild from scratch gives bit-identical weights on this machine."""
    from actors.tasks import shipped

    task, warm = _tiny(tmp_path)
    root = tmp_path / "shipped"
    entry = shipped.ship(task, warm, log_fn=lambda m: None, root=root)
    key = wu.cache_key(task, warm)
    assert entry == root / key and shipped.find(key, root) == entry
    sums = shipped.verify(entry)
    assert "model.safetensors" in sums and "warmup.json" in sums and not (entry / "data").exists()
    built = Path(warm.cache_dir) / key

    # install into an empty cache: nothing trained, same files, prompt files regenerated identical
    fresh = warm.model_copy(update={"cache_dir": str(tmp_path / "cache2")})
    monkeypatch.setattr(shipped, "SHIPPED_DIR", root)  # where warmup() looks (the package folder in real use)
    got = wu.warmup(tmp_path / "sft", task, fresh, log_fn=lambda m: None)
    assert got["shipped"] and got["cached"]
    inst = Path(got["cache_dir"])
    for name in ("model.safetensors", "warmup.json", "data/train.jsonl", "data/dev.jsonl", "data/heldout.jsonl"):
        assert (inst / name).read_bytes() == (built / name).read_bytes(), name

    # tampering is an error, not a fallback
    (entry / "extra.txt").write_text("x")
    with pytest.raises(shipped.ShippedWarmupError, match="do not match"):
        shipped.verify(entry)
    (entry / "extra.txt").unlink()
    data = bytearray((entry / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (entry / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(shipped.ShippedWarmupError, match="sha256"):
        shipped.verify(entry)
    data[-1] ^= 1
    (entry / "model.safetensors").write_bytes(bytes(data))

    # --verify: a rebuild from scratch is bit-identical here
    out = shipped.verify_rebuild(task, warm, log_fn=lambda m: None, root=root)
    assert out["identical"] and out["ok"] and out["diffs"]["heldout_sampled"] == 0.0


def test_the_default_recipe_is_shipped_and_intact():
    """The main command's warm-up is shipped (so a first run trains nothing) and its files
    match their checksums."""
    from actors.tasks import shipped
    from common.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    key = wu.cache_key(cfg.task, cfg.warmup)
    entry = shipped.find(key)
    assert entry is not None, f"no shipped warm-up for configs/tiny.yaml's recipe {key}: run launch/warmup.py --ship"
    shipped.verify(entry)
    info = json.loads((entry / "warmup.json").read_text())
    assert info["key"] == key and info["stop_reason"] != "max_seconds"
    assert info["heldout_greedy"] >= 0.95 and 0.6 <= info["heldout_sampled"] <= 0.8


def test_config_sections_and_cli(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_warmup", Path(__file__).resolve().parents[2] / "launch" / "warmup.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cfg = PrimeRunConfig()
    assert cfg.task.kind == "arithmetic" and cfg.warmup.hidden_size // cfg.warmup.heads >= 32
    task, warm = _tiny(tmp_path)
    overrides = [f"task.{k}={v}" for k, v in task.model_dump().items()] + [
        f"warmup.{k}={v}" for k, v in warm.model_dump().items()]
    cli.main(["--output", str(tmp_path / "out")] + overrides)
    assert (tmp_path / "out" / "warmup.json").is_file() and (tmp_path / "out" / "data" / "train.jsonl").is_file()


@pytest.mark.slow
def test_warmup_model_dir_runs_in_vllm(tmp_path):
    from actors.engines import make_engine

    task, warm = _tiny(tmp_path)
    warm = warm.model_copy(update={"hidden_size": 128, "heads": 4})  # vLLM on CPU: head_dim >= 32
    res = wu.warmup(tmp_path / "sft", task, warm)
    tok = ar.build_tokenizer()
    prompt = to_token_ids(ar.make_splits(0, 3, 2, {"heldout": 1}, fixed_width=True)["heldout"][0].prompt, tok)
    engine = make_engine("vllm", res["model_dir"], max_model_len=128)
    try:
        out = engine.generate([prompt], k=2, temperature=1.0, max_tokens=8, seed=0)
    finally:
        engine.close()
    assert len(out[0]) == 2 and all(1 <= len(s.token_ids) <= 8 for s in out[0])
