"""benchmarks/learner.py: the FLOPs model against hand arithmetic and the real module, and one
short run of the real learner on CPU (the GPU figures come from the same script on a GPU)."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_learner", ROOT / "benchmarks" / "learner.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_matmul_params_hand_computed_and_equal_to_the_models_linear_weights(bench):
    shape = bench.SHAPES["tiny"]
    # d=128, f=256, L=4, V=512, 4 heads of 32, 2 KV heads -> kv width 64
    # attention: q 128*128 + k 128*64 + v 128*64 + o 128*128 = 16384 + 8192 + 8192 + 16384 = 49152
    # MLP: gate, up, down 3*128*256 = 98304; per layer 147456; 4 layers 589824; LM head 512*128 = 65536
    assert bench.matmul_params(shape) == 655360
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**shape))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear == 655360  # the tied LM head is a Linear over the embedding matrix


def test_forward_flops_hand_computed(bench):
    shape = bench.SHAPES["tiny"]
    # T=3: 2*N*T = 2*655360*3 = 3932160; attention 2*L*d*T*(T+1) = 2*4*128*3*4 = 12288
    assert bench.forward_flops([3], shape) == 3932160 + 12288
    # sums over sequences; T=1: 2*655360 + 2*4*128*1*2 = 1310720 + 2048
    assert bench.forward_flops([3, 1], shape) == 3944448 + 1312768


def test_phase_passes(bench):
    # after: ref fwd 1 + PRM fwd/bwd 3; before adds the second PRM forward; none: ref + PRM forwards
    assert bench.phase_passes("after", "truncate", 1) == {"prm": 4, "old_logp": 1, "policy": 3, "weight_sync": 0}
    assert bench.phase_passes("before", "none", 2) == {"prm": 5, "old_logp": 0, "policy": 6, "weight_sync": 0}
    assert bench.phase_passes("none", "mask", 1)["prm"] == 2


def test_one_short_run_of_the_real_learner_on_cpu(bench, tmp_path):
    out = bench.main(["--shape", "tiny", "--dtype", "float32", "--groups", "2", "--k", "4", "--prompt-len", "8",
                      "--resp-len", "16", "--steps", "2", "--warmup", "1", "--peak-tflops", "1",
                      "--output", str(tmp_path / "b.json")])
    assert out["device"] == "cpu" and out["world_size"] == 1
    ph = out["phases"]
    assert all(ph[p]["s"] > 0 for p in ("prm", "old_logp", "policy", "weight_sync"))
    assert ph["weight_sync"]["mfu"] is None  # no model FLOPs in a broadcast
    # 8 responses of 8..16 tokens after an 8-token prompt: 8*(8+8) <= tokens <= 8*(8+16)
    assert 128 <= out["seq_tokens_per_step"] <= 192
    step_flops = out["step"]["tflops_per_s"] * out["step"]["s"]
    phase_flops = sum(p["tflops_per_s"] * p["s"] for p in ph.values())
    assert step_flops == pytest.approx(phase_flops, rel=1e-9)
    assert 0 < out["step"]["mfu"] < 1  # 1 TFLOP/s stated; the tiny model reaches far less on CPU
    assert (tmp_path / "b.json").is_file()
