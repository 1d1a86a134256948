"""learner/trainer.py: resume gives the same weights as an uninterrupted run (in-process,
and with FSDP2 on 2 gloo ranks, where checkpoints also cross between FSDP2 and plain/DDP),
and a 2-rank gloo learner (real processes, DDP or FSDP2) fed by a test actor over the real
ZeroMQ transport trains, publishes versions and writes its run directory."""

import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp

from synthetic import free_port, make_groups, tiny_qwen2  # noqa: E402

from common.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *extra):
    model_dir = tmp_path / "sft"
    if not model_dir.exists():
        tiny_qwen2(0).save_pretrained(model_dir)
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.policy_path={model_dir}", f"run.output_dir={tmp_path / 'run'}", "batch.prompts_per_step=4",
        "batch.policy_mini_batch=8", "batch.prm_mini_batch=16", "batch.micro_batch_tokens=64",
        "optim.policy.lr=1e-3", "optim.prm.lr=1e-3", "checkpoint.every=2", "logging.console=false",
        "run.deterministic=true", *extra])


def _params(learner):
    from learner.models import unwrap

    return torch.cat([p.detach().flatten() for p in unwrap(learner.models.policy).parameters()])


def test_resume_matches_uninterrupted(tmp_path):
    from learner.trainer import Learner

    torch.set_num_threads(1)
    data = [make_groups(4, seed=10 + i) for i in range(4)]
    a = Learner(_cfg(tmp_path, f"run.output_dir={tmp_path / 'a'}"))
    for groups in data:
        a.train_step(groups)
    assert a.step == 4 and a.policy_version == 4

    b = Learner(_cfg(tmp_path, f"run.output_dir={tmp_path / 'b'}"))
    for groups in data[:2]:
        b.train_step(groups)  # checkpoint.every=2 -> saved after step 2
    del b
    c = Learner(_cfg(tmp_path, f"run.output_dir={tmp_path / 'b'}"))
    assert c.restore() and c.step == 2 and c.policy_version == 2
    for groups in data[2:]:
        c.train_step(groups)
    assert torch.equal(_params(a), _params(c))
    fresh = Learner(_cfg(tmp_path, f"run.output_dir={tmp_path / 'fresh'}"))
    assert not torch.equal(_params(fresh), _params(a))  # training moved the weights


def _learner_rank(rank, world, port, overrides):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from learner.trainer import run_learner

    run_learner(load_config(ROOT / "configs" / "tiny.yaml", overrides))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_rank_learner_over_real_transport(tmp_path, parallel):
    from common.transport import ActorClient, ShutdownRequested

    traj, ctrl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    cfg = _cfg(tmp_path, f"transport.trajectory_addr={traj}", f"transport.control_addr={ctrl}", "run.steps=3",
               "async.max_staleness=1", "checkpoint.every=0")
    overrides = [f"{k}={v}" for k, v in [
        ("model.policy_path", cfg.model.policy_path), ("run.output_dir", cfg.run.output_dir),
        ("transport.trajectory_addr", traj), ("transport.control_addr", ctrl), ("run.steps", 3),
        ("batch.prompts_per_step", 4), ("batch.policy_mini_batch", 8), ("batch.prm_mini_batch", 16),
        ("batch.micro_batch_tokens", 64), ("optim.policy.lr", 1e-3), ("logging.console", "false"),
        ("checkpoint.every", 0), ("async.max_staleness", 1), ("model.parallel", parallel)]]
    ctx = tmp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_learner_rank, args=(r, 2, port, overrides)) for r in range(2)]
    for p in procs:
        p.start()

    actor = ActorClient(cfg.transport, "test-actor").start()
    sent, versions = 0, set()
    try:
        assert actor.wait_ready(timeout=120), "learner never answered"
        deadline = time.monotonic() + 300
        i = 0
        while time.monotonic() < deadline and not actor.shutdown_requested:
            v = actor.learner_version or 0
            versions.add(v)
            if not actor.admitted(v):
                time.sleep(0.05)
                continue
            try:
                if actor.send_group(make_groups(1, seed=100 + i, version=v)[0], timeout=0.5):
                    sent += 1
                    i += 1
            except ShutdownRequested:
                break
    finally:
        actor.close()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    run = Path(cfg.run.output_dir)
    assert sent >= 12  # 3 steps x 4 groups
    assert max(versions) >= 2  # versions advanced while the actor was sending
    import json

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert (run / "config.yaml").is_file() and (run / "final" / "config.json").is_file()
    assert any((run / "tb").iterdir())
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(run / "final")
    start = AutoModelForCausalLM.from_pretrained(cfg.model.policy_path)
    diff = sum(float((a - b).detach().abs().sum()) for a, b in zip(final.parameters(), start.parameters()))
    assert diff > 0
    prm = AutoModelForCausalLM.from_pretrained(run / "final_prm")  # the trained implicit PRM, loadable
    d_prm = sum(float((a - b).detach().abs().sum()) for a, b in zip(prm.parameters(), start.parameters()))
    d_pol = sum(float((a - b).detach().abs().sum()) for a, b in zip(prm.parameters(), final.parameters()))
    assert d_prm > 0 and d_pol > 0  # trained, and not the policy
    assert all((run / d / "tokenizer_config.json").is_file() for d in ("final", "final_prm"))  # both servable


def _full_params(learner):
    """The policy's whole parameters (FSDP2 shards gathered: call on every rank)."""
    from torch.distributed.tensor import DTensor

    from learner.models import unwrap

    return torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().flatten()
                      for p in unwrap(learner.models.policy).parameters()])


def _fsdp_resume_rank(rank, world, port, tmp_path, extra):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from learner.distributed import close_dist
    from learner.trainer import Learner

    tmp_path = Path(tmp_path)
    data = [make_groups(4, seed=10 + i) for i in range(4)]
    fsdp = [*extra, "model.parallel=fsdp2"]
    a = Learner(_cfg(tmp_path, f"run.output_dir={tmp_path / 'a'}", *fsdp))
    assert a.sharded
    for groups in data:
        a.train_step(groups)
    pa = _full_params(a)
    b = Learner(_cfg(tmp_path, f"run.output_dir={tmp_path / 'b'}", *fsdp))
    for groups in data[:2]:
        b.train_step(groups)  # checkpoint.every=2 -> saved after step 2 (gathered, rank 0 writes)
    del b
    c = Learner(_cfg(tmp_path, f"run.output_dir={tmp_path / 'b'}", "checkpoint.save_hf=true", *fsdp))
    assert c.restore() and c.step == 2 and c.policy_version == 2
    for groups in data[2:]:
        c.train_step(groups)
    pc = _full_params(c)
    final = c.save_final()  # collective; rank 0 writes
    # a plain (1-rank) checkpoint written by the test process, resumed under FSDP2
    e = Learner(_cfg(tmp_path, f"run.output_dir={tmp_path / 'e'}", *fsdp))
    assert e.restore(tmp_path / "d" / "checkpoints") and e.step == 2
    for groups in data[2:]:
        e.train_step(groups)
    pe = _full_params(e)
    if rank == 0:
        torch.save({"a": pa, "c": pc, "e": pe, "final": str(final)}, tmp_path / "fsdp_resume.pt")
    del a, c, e  # their FSDP2 models hold the group
    close_dist()


def test_fsdp2_resume_matches_uninterrupted(tmp_path):
    """FSDP2 on 2 ranks: resume after step 2 of 4 = the uninterrupted run, bit for bit; and
    checkpoints cross modes: plain -> FSDP2 and FSDP2 -> plain resumes match it to float
    noise (world 1 vs 2). Adam eps=1 keeps that noise linear (see test_learner_step)."""
    from learner.trainer import Learner

    torch.set_num_threads(1)
    extra = ["optim.policy.eps=1.0", "optim.prm.eps=1.0"]
    data = [make_groups(4, seed=10 + i) for i in range(4)]
    d = Learner(_cfg(tmp_path, f"run.output_dir={tmp_path / 'd'}", *extra))
    for groups in data[:2]:
        d.train_step(groups)  # plain checkpoint at step 2
    del d
    tmp.start_processes(_fsdp_resume_rank, args=(2, free_port(), str(tmp_path), extra), nprocs=2, start_method="spawn")
    r = torch.load(tmp_path / "fsdp_resume.pt")
    assert torch.equal(r["a"], r["c"])  # FSDP2 resume = uninterrupted FSDP2 run
    torch.testing.assert_close(r["e"], r["a"], atol=1e-5, rtol=1e-4)  # plain ckpt -> FSDP2
    f = Learner(_cfg(tmp_path, f"run.output_dir={tmp_path / 'f'}", *extra))
    assert f.restore(tmp_path / "b" / "checkpoints" / "step_00000002") and f.step == 2  # FSDP2 ckpt -> plain
    for groups in data[2:]:
        f.train_step(groups)
    torch.testing.assert_close(_params(f), r["a"], atol=1e-5, rtol=1e-4)
    assert not torch.equal(_params(Learner(_cfg(tmp_path, f"run.output_dir={tmp_path / 'g'}"))), r["a"])
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(r["final"])  # save_final under FSDP2
    assert saved.config.architectures == ["Qwen2ForCausalLM"]
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in saved.parameters()]), r["c"], atol=0, rtol=0)


def test_log_every_and_run_device_are_honoured(tmp_path):
    """logging.log_every=2 over 3 steps logs steps 2 and 3 (the last always); run.device=cpu
    puts the models on the CPU; run.device=cuda without a GPU is a clear error."""
    import json

    from learner.metrics_log import MetricsLogger
    from learner.trainer import Learner

    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "logging.log_every=2", "run.steps=3", "run.device=cpu", "logging.tensorboard=false")
    logger = MetricsLogger(cfg.run.output_dir, tensorboard=False, console=False)
    learner = Learner(cfg, logger=logger)
    assert learner.device.type == "cpu"
    for i in range(3):
        learner.train_step(make_groups(4, seed=20 + i))
    logger.close()
    rows = [json.loads(line) for line in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="run.device = cuda"):
            Learner(_cfg(tmp_path, "run.device=cuda", f"run.output_dir={tmp_path / 'c'}"))
