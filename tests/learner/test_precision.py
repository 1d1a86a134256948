"""Mixed precision in the learner (model.dtype=bfloat16, model.master_dtype=float32): the
policy and PRM keep fp32 master weights and fp32 AdamW state while the forwards compute in
bf16, so the paper's learning rates (5e-7 policy, 1e-6 PRM) move the weights, where AdamW
on bf16 parameters rounds almost every update away; the actors get the masters rounded to
bf16; checkpoints keep the masters bit for bit; final/ is written in bf16; FSDP2 (1-rank
gloo group) builds with a MixedPrecisionPolicy and trains the same way."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as tmp

from synthetic import free_port, make_groups, tiny_qwen2  # noqa: E402

from common.config import ConfigError, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *extra):
    tmp_path = Path(tmp_path)
    model_dir = tmp_path / "sft"
    if not model_dir.exists():
        tiny_qwen2(0).save_pretrained(model_dir)
    # 4 groups x k=4 = 16 responses = one policy and one PRM optimiser step per train_step
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.policy_path={model_dir}", f"run.output_dir={tmp_path / 'run'}", "model.dtype=bfloat16",
        "batch.prompts_per_step=4", "generation.k=4", "batch.policy_mini_batch=16", "batch.prm_mini_batch=16",
        "batch.ppo_epochs=1", "batch.micro_batch_tokens=64", "optim.policy.lr=5e-7", "optim.prm.lr=1e-6",
        "checkpoint.every=0", "checkpoint.save_hf=true", "logging.console=false", *extra])


class _Capture:
    """A weight sender that keeps what it is given."""

    def __init__(self):
        self.sent = []

    def send(self, state, version):
        self.sent.append((version, state))
        return SimpleNamespace(bytes=sum(v.nbytes for v in state.values()), receivers=1, failed=0)

    def close(self):
        pass


def _named(model):
    from learner.models import unwrap

    return {n: p.detach().clone() for n, p in unwrap(model).named_parameters()}


def _moved(after: dict, before: dict) -> float:
    changed = sum(int((after[n] != before[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def test_master_dtype_validated():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.dtype=bfloat16"])
    assert cfg.model.master_dtype == "float32"
    load_config(ROOT / "configs" / "tiny.yaml", ["model.dtype=bfloat16", "model.master_dtype=bfloat16"])
    try:
        load_config(ROOT / "configs" / "tiny.yaml", ["model.dtype=float32", "model.master_dtype=bfloat16"])
    except ConfigError as e:
        assert "model.master_dtype" in str(e)
    else:
        raise AssertionError("master_dtype narrower than dtype accepted")


def test_token_logprobs_autocast_computes_in_bf16_returns_fp32():
    from learner.logprobs import token_logprobs

    model = tiny_qwen2(0)
    ids = torch.randint(0, 64, (2, 12))
    attn = torch.ones_like(ids)
    ref = token_logprobs(model, ids, attn, 1.0)
    low = token_logprobs(model, ids, attn, 1.0, torch.bfloat16)
    assert low.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32
    assert not torch.equal(low, ref)  # the matmuls really ran in bf16
    torch.testing.assert_close(low, ref, atol=0.05, rtol=0.0)


def test_fp32_masters_move_at_paper_lr_where_bf16_params_do_not(tmp_path):
    from learner.models import unwrap
    from learner.trainer import Learner

    learner = Learner(_cfg(tmp_path))
    m = learner.models
    for model in (m.policy, m.prm):
        assert all(p.dtype == torch.float32 for p in unwrap(model).parameters())
    assert all(p.dtype == torch.bfloat16 for p in m.ref.parameters())
    p0, q0 = _named(m.policy), _named(m.prm)
    # the old behaviour: AdamW (same hyper-parameters) directly on bf16 parameters, fed the
    # same (clipped) gradients the fp32 masters' optimiser saw
    o = learner.cfg.optim.policy
    old = {n: t.to(torch.bfloat16).requires_grad_() for n, t in p0.items()}
    old_opt = torch.optim.AdamW(list(old.values()), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                weight_decay=o.weight_decay)
    for i in range(3):
        met = learner.train_step(make_groups(4, seed=10 + i))
        assert met["loss/grad_norm"] > 0
        for n, p in unwrap(m.policy).named_parameters():
            assert p.grad.dtype == torch.float32
            old[n].grad = p.grad.to(torch.bfloat16)
        old_opt.step()
    for opt in (m.policy_opt, m.prm_opt):
        states = [s for s in opt.state.values()]
        assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
    moved = _moved(_named(m.policy), p0)
    moved_prm = _moved(_named(m.prm), q0)
    moved_old = _moved({n: t.detach() for n, t in old.items()}, {n: t.to(torch.bfloat16) for n, t in p0.items()})
    print(f"\nlr 5e-7, 3 steps: fp32 masters moved {moved:.1%} of policy elements (PRM at 1e-6: {moved_prm:.1%}); "
          f"AdamW on bf16 parameters moved {moved_old:.2%}")
    assert moved > 0.5 and moved_prm > 0.5
    assert moved_old < 0.05


def test_published_weights_are_masters_rounded_to_bf16(tmp_path):
    from learner.models import unwrap
    from learner.trainer import Learner

    sender = _Capture()
    learner = Learner(_cfg(tmp_path), sender=sender)
    learner.publish()
    learner.train_step(make_groups(4, seed=10))
    assert [v for v, _ in sender.sent] == [0, 1]
    for _, state in sender.sent[-1:]:
        masters = unwrap(learner.models.policy).state_dict()
        assert state.keys() == masters.keys()
        for k, v in state.items():
            assert v.dtype == torch.bfloat16 and v.device.type == "cpu", k
            assert torch.equal(v, masters[k].to(torch.bfloat16)), k
        # tied embeddings stay one tensor, so the sender ships them once
        assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()


def test_checkpoint_keeps_fp32_masters_bit_exact_and_final_is_bf16(tmp_path):
    from safetensors.torch import load_file

    from learner.checkpoint import load_checkpoint
    from learner.trainer import Learner

    a = Learner(_cfg(tmp_path))
    for i in range(2):
        a.train_step(make_groups(4, seed=10 + i))
    path = a.save()
    s = load_checkpoint(path)
    assert all(t.dtype == torch.float32 for t in s["policy"].values())
    assert all(t.dtype == torch.float32 for st in s["policy_opt"]["state"].values() for k, t in st.items()
               if k != "step")
    b = Learner(_cfg(tmp_path))
    assert b.restore() and b.step == 2
    for x, y in ((a.models.policy, b.models.policy), (a.models.prm, b.models.prm)):
        px, py = _named(x), _named(y)
        assert all(py[n].dtype == torch.float32 and torch.equal(px[n], py[n]) for n in px)
    for x, y in ((a.models.policy_opt, b.models.policy_opt), (a.models.prm_opt, b.models.prm_opt)):
        sx, sy = x.state_dict()["state"], y.state_dict()["state"]
        assert sx.keys() == sy.keys()
        for i in sx:
            for k in ("exp_avg", "exp_avg_sq"):
                assert sy[i][k].dtype == torch.float32 and torch.equal(sx[i][k], sy[i][k])
    # the serving copy: bf16 weights, config says bf16, and it equals the masters rounded
    final = b.save_final()
    weights = load_file(final / "model.safetensors")
    masters = _named(b.models.policy)
    assert weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    for k, t in weights.items():
        assert torch.equal(t, masters[k].to(torch.bfloat16)), k
    conf = json.loads((final / "config.json").read_text())
    assert conf.get("dtype", conf.get("torch_dtype")) == "bfloat16"
    from transformers import AutoModelForCausalLM

    served = AutoModelForCausalLM.from_pretrained(final, dtype="auto")
    assert next(served.parameters()).dtype == torch.bfloat16


def _fsdp_rank(rank, world, port, tmp_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    from learner.distributed import close_dist
    from learner.trainer import Learner

    sender = _Capture()
    learner = Learner(_cfg(tmp_path, "model.parallel=fsdp2", "optim.policy.lr=5e-7"), sender=sender)
    m = learner.models
    assert learner.sharded
    out = {
        "mp": [str(mod._get_fsdp_state()._mp_policy.param_dtype) for mod in (m.policy, m.prm)],
        "local_dtypes": sorted({str(p.to_local().dtype) for p in m.policy.parameters() if isinstance(p, DTensor)}),
        "ref_dtypes": sorted({str(p.dtype) for p in m.ref.parameters()}),
    }
    with torch.no_grad():
        ids = torch.randint(0, 64, (1, 8))
        out["logits_dtype"] = str(m.policy(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.dtype)
    full0 = {k: v.clone() for k, v in learner.state()["policy"].items()}  # gathered fp32 masters
    learner.train_step(make_groups(4, seed=10))
    s = learner.state()
    out["master_dtypes"] = sorted({str(v.dtype) for v in s["policy"].values()})
    out["opt_dtypes"] = sorted({str(t.dtype) for st in s["policy_opt"]["state"].values() for k, t in st.items()
                                if k != "step"})
    out["moved"] = _moved(s["policy"], full0)
    state = sender.sent[-1][1]
    out["sent_dtypes"] = sorted({str(v.dtype) for v in state.values()})
    out["sent_is_rounded_masters"] = all(torch.equal(state[k], s["policy"][k].to(torch.bfloat16)) for k in state)
    torch.save(out, Path(tmp_path) / "fsdp2_precision.pt")
    del learner, m  # their FSDP2 models hold the group
    close_dist()


def test_fsdp2_one_rank_mixed_precision_policy(tmp_path):
    _cfg(tmp_path)  # writes the tiny model once, in this process
    tmp.start_processes(_fsdp_rank, args=(1, free_port(), str(tmp_path)), nprocs=1, start_method="spawn")
    out = torch.load(tmp_path / "fsdp2_precision.pt")
    print(f"\nFSDP2 (1 rank, gloo), lr 5e-7, 1 step: masters moved {out['moved']:.1%}")
    assert out["mp"] == ["torch.bfloat16", "torch.bfloat16"]
    assert out["local_dtypes"] == ["torch.float32"] and out["master_dtypes"] == ["torch.float32"]
    assert out["opt_dtypes"] == ["torch.float32"]
    assert out["ref_dtypes"] == ["torch.bfloat16"]
    assert out["logits_dtype"] == "torch.bfloat16"  # computed with bf16 parameters
    assert out["sent_dtypes"] == ["torch.bfloat16"] and out["sent_is_rounded_masters"]
    assert out["moved"] > 0.5
