"""Learner throughput per PRIME phase: tokens/s and model FLOPs utilisation (MFU).

    .venv/bin/python benchmarks/learner.py                       # CPU: a tiny Qwen2, float32
    python benchmarks/learner.py --shape qwen2-0.5b --dtype bfloat16   # one GPU (NCCL path)
    torchrun --nproc-per-node N benchmarks/learner.py --shape qwen2-0.5b --dtype bfloat16 --parallel fsdp2

What runs: the real learner (``learner.trainer.Learner``: ``build_models``, ``prime_step``,
``publish``) on a random-initialised model of a real architecture's shape, saved to a
temporary directory and loaded like any policy, fed synthetic trajectory groups (random
tokens, fixed prompt length, response lengths uniform in [resp_len/2, resp_len], 1..K-1
correct per group so every group passes the accuracy filter). No actors: the weights are
published through the configured weight-sync sender (shm by default) with no receiver, so
the learner-side cost of a broadcast (gather, device-to-host copy, write) is measured and
the delivery to actors is not (``benchmarks/weight_sync.py`` measures that).

Phases (from the step's own timers, device-synchronised): ``prm`` = reference forward + PRM
forward/backward (+ the second PRM forward for prm_update=before), ``old_logp`` = π_old
recomputation (when loss.correction is not none), ``policy`` = policy forward/backward over
ppo_epochs, ``weight_sync`` = publish. Model FLOPs count the useful work only (no padding):
a forward over a sequence of length T costs 2·N·T + 2·L·d·T·(T+1) FLOPs, with N the matmul
parameters (every linear layer incl. the LM head; embedding lookups are free) and the second
term causal attention (QKᵀ and AV over the T(T+1)/2 visible pairs, per layer); a backward
costs twice the forward. MFU = model FLOPs / (seconds × peak FLOP/s of the device, dense, in
the model's dtype; ``--peak-tflops`` overrides the table below). Each figure is the median
over ``--steps`` steps after ``--warmup`` untimed ones. The last line names the device and
ends with the whole step's MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from learner.prime import CORRECTIONS  # noqa: E402

# Model shapes (transformers Qwen2Config fields). qwen2-0.5b is Qwen2-0.5B's published shape.
SHAPES = {
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1_000_000.0, tie_word_embeddings=True),
    "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1_000_000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=True),
}

# Dense peak TFLOP/s by device-name fragment and dtype (vendor datasheets, no sparsity).
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9},
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "float32": 51.2},
    "H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9},  # SXM
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
}


def matmul_params(shape: dict) -> int:
    """N: weights that multiply activations, per token — attention q/k/v/o, the MLP's
    gate/up/down, the LM head (tied or not, it is a matmul); not embeddings or norms."""
    d, f, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    attn = d * d + 2 * d * kv + d * d  # q, k, v, o
    mlp = 3 * d * f
    return L * (attn + mlp) + V * d


def forward_flops(seq_lengths, shape: dict) -> float:
    """Model FLOPs of one forward over sequences of the given lengths (no padding):
    Σ_T 2·N·T + 2·L·d·T·(T+1) (the attention term: QKᵀ and AV, 2·d FLOPs each per visible
    (query, key) pair, T(T+1)/2 pairs under the causal mask, per layer)."""
    N, L, d = matmul_params(shape), shape["num_hidden_layers"], shape["hidden_size"]
    T = np.asarray(seq_lengths, dtype=np.float64)
    return float((2.0 * N * T + 2.0 * L * d * T * (T + 1)).sum())


def phase_passes(prm_update: str, correction: str, ppo_epochs: int) -> dict[str, float]:
    """Forward-equivalents per phase (forward = 1, forward + backward = 3)."""
    prm = {"after": 1 + 3, "before": 1 + 3 + 1, "none": 1 + 1}[prm_update]  # ref fwd + PRM
    return {"prm": prm, "old_logp": 0 if correction == "none" else 1, "policy": 3 * ppo_epochs, "weight_sync": 0}


def peak_tflops(device: torch.device, dtype: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"--peak-tflops {override:g}"
    if device.type != "cuda":
        return None, "unknown (CPU: pass --peak-tflops for an MFU)"
    name = torch.cuda.get_device_name(device)
    for frag, table in PEAK_TFLOPS.items():
        if frag in name:
            return table[dtype], f"{name}, {dtype} dense {table[dtype]:g} TFLOP/s"
    return None, f"{name} not in the table (pass --peak-tflops)"


def synthetic_groups(n_groups: int, k: int, vocab: int, prompt_len: int, resp_len: int, seed: int):
    from common.schema import Array, Response, TrajectoryGroup

    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        n_correct = int(rng.integers(1, k))
        outcomes = rng.permutation([1.0] * n_correct + [0.0] * (k - n_correct))
        responses = []
        for i in range(k):
            T = int(rng.integers(max(resp_len // 2, 1), resp_len + 1))
            responses.append(Response(
                token_ids=Array.from_numpy(rng.integers(3, vocab, size=T), "int32"),
                behav_logp=Array.from_numpy(-rng.uniform(0.1, 3.0, size=T), "float32"),
                policy_version=Array.from_numpy(np.zeros(T), "int32"),
                finish_reason="stop", outcome_reward=float(outcomes[i]),
                verifier_status="correct" if outcomes[i] else "wrong"))
        groups.append(TrajectoryGroup(prompt_id=f"bench-{seed}-{g}",
                                      prompt_tokens=Array.from_numpy(rng.integers(3, vocab, size=prompt_len), "int32"),
                                      responses=responses, policy_version=0, gen_s=0.0, verify_s=0.0))
    return groups


def frozen_prm(args, model_dir: Path, tmp: Path) -> list[str]:
    """--prm-update none is refused with the PRM equal to the reference (process rewards 0);
    this benchmark times passes only, so the frozen PRM is the same weights under another
    path (a symlink), which the config accepts."""
    if args.prm_update != "none":
        return []
    link = Path(tmp) / "frozen-prm"
    if not link.exists():
        link.symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    return [f"model.prm_path={link}"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b" if gpu else "tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16" if gpu else "float32")
    ap.add_argument("--parallel", choices=["ddp", "fsdp2"], default="ddp")
    ap.add_argument("--groups", type=int, default=32 if gpu else 4, help="prompt groups per step [groups]")
    ap.add_argument("--k", type=int, default=4, help="responses per prompt [responses]")
    ap.add_argument("--prompt-len", type=int, default=256, help="[tokens]")
    ap.add_argument("--resp-len", type=int, default=1024 if gpu else 128, help="longest response [tokens]")
    ap.add_argument("--mini-batch", type=int, default=0, help="responses per optimiser step; 0 = the whole step [responses]")
    ap.add_argument("--micro-batch-tokens", type=int, default=8192 if gpu else 2048, help="[tokens]")
    ap.add_argument("--prm-update", choices=["after", "before", "none"], default="after")
    ap.add_argument("--correction", choices=list(CORRECTIONS), default="truncate")
    ap.add_argument("--weight-sync", choices=["shm", "none"], default="shm")
    ap.add_argument("--steps", type=int, default=3, help="timed steps [steps]")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first [steps]")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak, dense, in --dtype [TFLOP/s]")
    ap.add_argument("--output", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from common.config import load_config
    from common.weight_sync import sender_from_config
    from learner.rollout import build_batch
    from learner.trainer import Learner

    shape = SHAPES[args.shape]
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    tmp = Path(tempfile.mkdtemp(prefix="prime-bench-learner-"))
    model_dir = tmp / "model"
    if rank == 0:  # one random model on disk, loaded by every rank like a real policy
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(**shape)).to(getattr(torch, args.dtype)).save_pretrained(model_dir)
    if world > 1:
        import torch.distributed as dist

        from learner.distributed import init_dist

        init_dist()
        path = [str(model_dir)]
        dist.broadcast_object_list(path, 0)  # rank 0's local path (single node); not network input
        model_dir = Path(path[0])
    responses = args.groups * args.k
    mb = args.mini_batch or responses
    cfg = load_config(None, [
        f"run.output_dir={tmp / 'run'}", f"model.policy_path={model_dir}", f"model.dtype={args.dtype}",
        f"model.parallel={args.parallel}", "model.ref=sft", f"generation.k={args.k}",
        f"batch.prompts_per_step={args.groups}", f"batch.policy_mini_batch={mb}", f"batch.prm_mini_batch={mb}",
        f"batch.micro_batch_tokens={args.micro_batch_tokens}", f"prime.prm_update={args.prm_update}",
        f"loss.correction={args.correction}", "checkpoint.every=0", "checkpoint.save_hf=false",
        "async.weight_sync=shm", f"generation.max_tokens={args.resp_len}", *frozen_prm(args, model_dir, tmp),
        # the phases in sequence, so each phase's seconds are its own passes' (MFU per phase)
        "placement.prm_thread=false",
    ])
    sender = None
    if rank == 0 and args.weight_sync == "shm":
        sender = sender_from_config(cfg.async_, num_receivers=0, channel=f"bench-learner-{os.getpid()}")
    learner = Learner(cfg, sender=sender)
    dev = learner.device

    passes = phase_passes(args.prm_update, args.correction, 1)
    rows = []
    for s in range(args.warmup + args.steps):
        groups = synthetic_groups(args.groups, args.k, shape["vocab_size"], args.prompt_len, args.resp_len, seed=s)
        lengths = build_batch(groups).seq_lengths().numpy()
        m = learner.train_step(groups if rank == 0 else None)
        if s >= args.warmup:
            m["_fwd_flops"] = forward_flops(lengths, shape)
            m["_seq_tokens"] = float(lengths.sum())
            rows.append(m)
    if sender is not None:
        sender.close()
    if rank != 0:
        return {}
    shutil.rmtree(tmp, ignore_errors=True)  # the random model (GBs for the real shapes)

    peak, peak_src = peak_tflops(dev, args.dtype, args.peak_tflops)
    med = lambda key: statistics.median(r.get(key, 0.0) for r in rows)  # noqa: E731
    fwd, seq_tok, resp_tok = med("_fwd_flops"), med("_seq_tokens"), med("system/tokens")
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "world_size": world,
           "shape": args.shape, "matmul_params": matmul_params(shape), "dtype": args.dtype,
           "parallel": args.parallel, "groups": args.groups, "k": args.k, "prompt_len": args.prompt_len,
           "resp_len": args.resp_len, "seq_tokens_per_step": seq_tok, "response_tokens_per_step": resp_tok,
           "peak_tflops": peak, "peak_source": peak_src, "phases": {}}
    timers = {"prm": "time/prm_s", "old_logp": "time/old_logp_s", "policy": "time/policy_s",
              "weight_sync": "time/weight_sync_s"}
    total_s = total_flops = 0.0
    for ph, key in timers.items():
        sec = med(key)
        flops = passes[ph] * fwd * world  # each rank's figure is its share; the step is all ranks
        total_s += sec
        total_flops += flops
        out["phases"][ph] = {"s": sec, "seq_tokens_per_s": seq_tok / sec if sec > 0 else 0.0,
                             "tflops_per_s": flops / sec / 1e12 if sec > 0 else 0.0,
                             "mfu": flops / sec / (peak * 1e12 * world) if sec > 0 and peak and flops else None}
    out["step"] = {"s": total_s, "response_tokens_per_s": resp_tok / total_s,
                   "seq_tokens_per_s": seq_tok / total_s, "tflops_per_s": total_flops / total_s / 1e12,
                   "mfu": total_flops / total_s / (peak * 1e12 * world) if peak else None}

    from rich.console import Console
    from rich.table import Table

    print(f"learner, {args.shape} ({matmul_params(shape) / 1e6:.0f}M matmul params, {args.dtype}, "
                    f"{args.parallel}, world {world}), {args.groups}x{args.k} responses, "
                    f"{seq_tok:.0f} tokens/step, median of {len(rows)} steps")
    t = Table()
    for c in ("phase", "s", "tokens/s", "TFLOP/s", "MFU"):
        t.add_column(c, justify="right")
    for ph, r in list(out["phases"].items()) + [("step", out["step"])]:
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "-"
        tps = "-" if ph == "weight_sync" else f"{r['seq_tokens_per_s']:.0f}"  # no tokens in a broadcast
        t.add_row(ph, f"{r['s']:.3f}", tps, f"{r['tflops_per_s']:.2f}", mfu)
    Console().print(t)
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=2))
    mfu = out["step"]["mfu"]
    print(f"device: {out['device']} (peak {peak_src}); step {total_s:.2f} s, "
          f"{out['step']['response_tokens_per_s']:.0f} response tokens/s, "
          f"MFU {'%.1f%%' % (mfu * 100) if mfu is not None else 'n/a'}")
    return out


if __name__ == "__main__":
    main()
