"""benchmarks/learner.py: the FLOPs model against hand arithmetic and the real module, and one
short run of the real learner on CPU (the GPU figures come from the same script on a GPU).
benchmarks/staleness.py: its per-run figures against hand arithmetic; benchmarks/pipeline.py: its
overlap figures against hand arithmetic; benchmarks/scaling.py: its fairness and admission figures
by hand, and one small real run."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("learner")


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


def test_staleness_run_figures_hand_computed():
    fig = _load("staleness").run_figures
    rows = [
        {"time": 5.0, "time/wait_data_s": 4.0, "system/version_lag_mean": 0.0, "system/version_lag_max": 0.0},
        {"time": 7.0, "time/wait_data_s": 1.0, "system/version_lag_mean": 0.5, "system/version_lag_max": 1.0,
         "actor/tokens_per_s": 100.0},
        {"time": 8.0, "time/wait_data_s": 0.5, "system/version_lag_mean": 1.0, "system/version_lag_max": 2.0,
         "actor/tokens_per_s": 300.0},
        {"time": 11.0, "time/wait_data_s": 0.25, "system/version_lag_mean": 0.0, "system/version_lag_max": 1.0,
         "actor/tokens_per_s": 200.0, "system/groups_stale": 3.0, "system/groups_received": 40.0},
    ]
    evals = [{"accuracy": 0.5}, {"accuracy": 0.6}, {"accuracy": 0.7}, {"accuracy": 0.9}]
    f = fig(rows, evals, skip=1, last_n=2)
    assert "learner_cpu_per_step" not in f and "actor_cpu_per_step" not in f  # (runs from before the CPU metrics)
    for r, cpu, actor in zip(rows, (9.0, 1.5, 0.5, 2.5), (1.0, 2.0, 3.0, 6.0)):
        r["system/cpu_s"], r["actor/cpu_s"] = cpu, actor
    f = fig(rows, evals, skip=1, last_n=2)
    # learner: steps after the first steady row, (0.5 + 2.5) / 2; actor: cumulative, (6 - 2) / 2
    assert f["learner_cpu_per_step"] == pytest.approx(1.5, abs=1e-12)
    assert f["actor_cpu_per_step"] == pytest.approx(2.0, abs=1e-12)
    # steady = rows 1..3: (11 - 7) / 2 steps = 2.0 s per step
    assert f["s_per_step"] == pytest.approx(2.0, abs=1e-12)
    # waits after the first steady row: (0.5 + 0.25) / 4 s = 0.1875
    assert f["wait_data_share"] == pytest.approx(0.1875, abs=1e-12)
    # lag: mean of 0.5, 1.0, 0.0 = 0.5; max over all rows 2
    assert f["lag_mean"] == pytest.approx(0.5, abs=1e-12) and f["lag_max"] == 2.0
    assert f["groups_stale"] == 3.0 and f["groups_received"] == 40.0
    assert f["actor_tokens_per_s"] == 200.0  # median of 100, 300, 200
    # accuracy: first 0.5; the last two (0.7 + 0.9) / 2 = 0.8
    assert f["acc_start"] == 0.5 and f["acc_end"] == pytest.approx(0.8, abs=1e-12)
    with pytest.raises(ValueError, match="need more"):
        fig(rows[:2], evals, skip=1, last_n=2)


def test_pipeline_overlap_figures_hand_computed():
    of = _load("pipeline").overlap_figures
    # sync: 2.0 s/step, 40% waiting -> Tgen 0.8, Ttrain 1.2; async 1.5 s/step
    f = of({"s_per_step": 2.0, "wait_data_share": 0.4}, {"s_per_step": 1.5, "wait_data_share": 0.1})
    assert (f["t_gen"], f["t_train"]) == (pytest.approx(0.8, abs=1e-12), pytest.approx(1.2, abs=1e-12))
    assert f["speedup"] == pytest.approx(2.0 / 1.5, abs=1e-12)
    assert f["bound"] == pytest.approx(2.0 / 1.2, abs=1e-12)  # (0.8 + 1.2) / max(0.8, 1.2)
    assert f["ratio"] == pytest.approx((2.0 / 1.5) / (2.0 / 1.2), abs=1e-12)  # = 0.8
    # generation-bound: Tgen 1.5 > Ttrain 0.5 -> bound 2.0 / 1.5; a perfect overlap gives ratio 1
    f = of({"s_per_step": 2.0, "wait_data_share": 0.75}, {"s_per_step": 1.5, "wait_data_share": 0.6})
    assert f["bound"] == pytest.approx(2.0 / 1.5, abs=1e-12) and f["ratio"] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="no learner compute"):
        of({"s_per_step": 2.0, "wait_data_share": 1.0}, {"s_per_step": 1.0, "wait_data_share": 0.0})
    # the cores' bound: sync 2.0 s/step (Tgen 0.8, Ttrain 1.2), learner 1.8 + actor 0.8 CPU s per
    # step on 2 cores -> an async step needs >= 1.3 s: bound 2.0 / 1.3, ratio (2.0 / 1.5) / (2.0 / 1.3)
    sync = {"s_per_step": 2.0, "wait_data_share": 0.4, "learner_cpu_per_step": 1.8, "actor_cpu_per_step": 0.8}
    f = of(sync, {"s_per_step": 1.5, "wait_data_share": 0.1}, cores=2)
    assert f["t_cores"] == pytest.approx(1.3, abs=1e-12) and f["bound_cores"] == pytest.approx(2.0 / 1.3, abs=1e-12)
    assert f["ratio_cores"] == pytest.approx(1.3 / 1.5, abs=1e-12) and f["bound"] == pytest.approx(2.0 / 1.2, abs=1e-12)
    # each side on its own core (CPU = its busy time): the cores allow the overlap, the bounds agree
    sync.update(learner_cpu_per_step=1.2, actor_cpu_per_step=0.8)
    f = of(sync, {"s_per_step": 1.5, "wait_data_share": 0.1}, cores=2)
    assert f["bound_cores"] == pytest.approx(f["bound"], abs=1e-12)
    assert "t_cores" not in of({"s_per_step": 2.0, "wait_data_share": 0.4}, {"s_per_step": 1.5}, cores=2)


def test_scaling_fairness_and_admission_excess_by_hand():
    sc = _load("scaling")
    assert sc.jain([5, 5, 5, 5]) == pytest.approx(1.0, abs=1e-12)
    assert sc.jain([8, 0, 0, 0]) == pytest.approx(0.25, abs=1e-12)  # one takes all: 1/n
    assert sc.jain([1, 3]) == pytest.approx(16 / (2 * 10), abs=1e-12)  # (1+3)^2 / (2 (1+9))
    # η = 1, B = 10: bound at version v is (v + 2) * 10
    assert sc.admission_excess({0: 12, 1: 31, 2: 35}, eta=1, batch=10) == 1  # 31 - 30
    assert sc.admission_excess({0: 20, 1: 30}, eta=1, batch=10) == 0


def test_scaling_intake_with_real_actor_processes():
    """benchmarks/scaling.py end to end on a small case: a gloo broadcast to 1 and 2 receiving
    processes; a real LearnerServer + Ingest and two load-generating actor processes: every
    group sent arrives valid, and both are served."""
    out = _load("scaling").main(["--actors", "2", "--seconds", "2", "--rate", "40", "--batch", "8", "--port", "0",
                                 "--broadcast", "1,2", "--mb", "1", "--reps", "2"])
    assert [b["receivers"] for b in out["broadcast"]] == [1, 2]
    assert all(len(b["all_s"]) == 3 and b["send_s"] > 0 for b in out["broadcast"])  # 1 untimed + 2 timed
    (case,) = out["cases"]
    assert case["accepted_groups_per_s"] > 0 and case["versions"] >= 1
    assert case["rejected"] == 0 and case["lost"] == 0 and case["stale"] == 0
    assert case["received"] <= case["sent"] <= case["started"]
    assert case["fairness_received"] > 0.8 and case["rtt_median_ms"] is not None


def test_soak_slope_and_roles_by_hand():
    soak = _load("soak")
    # 10 MiB over 30 minutes is 20 MiB/h; a flat series is 0
    assert soak.slope_per_hour([0.0, 900.0, 1800.0], [100.0, 105.0, 110.0]) == pytest.approx(20.0)
    assert soak.slope_per_hour([0.0, 60.0, 120.0], [50.0, 50.0, 50.0]) == 0.0
    assert soak.slope_per_hour([5.0], [1.0]) == 0.0
    assert soak.role("python -m torch.distributed.run --standalone launch/learner.py --config c") == "torchrun agent"
    assert soak.role("python launch/learner.py --config c") == "learner"
    assert soak.role("python -u -m launch.learner --config c") == "learner"  # after launch.as_module
    assert soak.role("python -m launch.run --config c") == "launcher"
    assert soak.role("python -m launch.actors --config c --slot 0") == "actor"
    assert soak.role("python launch/actors.py --evaluator --config c") == "evaluator"
    assert soak.role("python launch/actors.py --config c --slot 0") == "actor"
    assert soak.role("python -c from multiprocessing.spawn import spawn_main; spawn_main()") == "verifier"
    import os

    here = soak.sample(os.getpid())  # this process's own tree: pytest at least
    assert sum(here.values()) > 10.0


def test_credit_diagnosis_reads_problems_and_finds_the_slipped_step():
    """benchmarks/credit.py: a prompt parsed back to its problem, the word layout of the
    steps, and the one slipped step of a response the task diagnoses as a slip."""
    from actors.tasks.arithmetic import Problem, Slip, diagnose, render_solution

    credit = _load("credit")
    p = credit.parse_problem("1 7 + 2 5 - 0 8 * 2", width=2)
    assert p == Problem(start=17, ops=(("+", 25), ("-", 8), ("*", 2)), width=2)
    text = render_solution(p, Slip(step=1, delta=2))  # 17+25 = 42 ; 42-8 = 36 (34 + 2) ; 36*2 = 72
    words = text.split()
    assert diagnose(p, text) == "slip" and words[-2] == "2" and words[-3] == "7"
    layout = credit.step_layout(words)
    assert len(layout) == 3 and all(words[e - 1] == "=" and words[end] == ";" for _, e, end in layout)
    assert credit.slipped_step(p, words) == 1
    assert words[layout[1][1]:layout[1][2]] == ["3", "6"]  # the slipped result's tokens
    assert credit.slipped_step(p, render_solution(p).split()) is None  # no wrong step


def test_prime_overhead_side_by_side_on_the_shipped_policy(tmp_path):
    """benchmarks/prime_overhead.py, 2 timed steps: RLOO has no PRM phase, PRIME has one and
    costs more in all; both learners train (distinct runs, same groups)."""
    out = _load("prime_overhead").main(["--steps", "2", "--warmup", "0", "--groups", "4", "--both-prm-thread",
                                        f"warmup.cache_dir={tmp_path / 'cache'}", "batch.prompts_per_step=4",
                                        "batch.policy_mini_batch=16", "batch.prm_mini_batch=16"])
    med = out["medians"]
    # configs/tiny.yaml runs the PRM's work in sequence: the third learner has the side thread
    assert set(med) == {"prime", "rloo", "prime-thread"}
    assert med["prime-thread"]["prm"] > 1e-3 and len(out["steps"]["prime-thread"]) == 2
    assert med["rloo"]["prm"] < 1e-3 < med["prime"]["prm"]  # RLOO: only the phase clock
    assert med["prime"]["policy"] > 0 and med["rloo"]["policy"] > 0
    assert out["ratio"] == pytest.approx(med["prime"]["learner"] / med["rloo"]["learner"])
    assert out["ratio"] > 1.0
    assert len(out["steps"]["prime"]) == len(out["steps"]["rloo"]) == 2
