"""End to end: ``launch/run.py`` with real processes (torchrun learner, supervised actor,
evaluator) on the embedded arithmetic task, shrunk to run in about a minute: a small
warm-up (cached in the test's tmp dir), a handful of RL steps.

Checked: the run completes and prints the summary line; groups flowed (the learner
received them and trained on them); versions advanced; the weights changed; the run
directory is complete (resolved config, TensorBoard events, checkpoints, final policy with
tokenizer, metrics and evaluation JSONL, plot, summary); with weights over gloo, an actor
killed with SIGKILL mid-run is restarted, rejoins the weight sync and the run still completes
with the version lag within η + 1; Ctrl-C (SIGINT) leaves no process of the run alive.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from synthetic import free_port

ROOT = Path(__file__).resolve().parents[2]

SMALL = ["generation.engine=hf", "generation.max_tokens=48", "task.sft_size=300", "task.train_size=256",
         "task.dev_size=16", "task.heldout_size=16", "warmup.hidden_size=64", "warmup.heads=2",
         "warmup.intermediate_size=128", "warmup.layers=2", "warmup.max_steps=10", "warmup.eval_every=10",
         "batch.prompts_per_step=4", "batch.policy_mini_batch=16", "batch.prm_mini_batch=16",
         "prime.filter_low=0.0", "prime.filter_high=1.0", "eval.every=2", "checkpoint.every=2",
         "actors.restart_backoff_s=0.5", "logging.console=false"]


def procs_mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().split()[2]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if text in cmd and state != "Z":
            out.append(int(d.name))
    return out


def learner_workers(run_dir) -> list[int]:
    """The learner's torchrun workers: ``launch/learner.py`` re-executes itself as
    ``python -m launch.learner`` (launch/__init__.py), which torchrun's own command line never reads."""
    return procs_mentioning(f"-m launch.learner --config {run_dir}/config.yaml")


def launch(tmp_path, run_dir, steps, extra=()):
    # free ports: a run already on this host (its learner on the default ports) is not joined
    ports = [f"transport.trajectory_addr=tcp://127.0.0.1:{free_port()}",
             f"transport.control_addr=tcp://127.0.0.1:{free_port()}"]
    args = [sys.executable, str(ROOT / "launch" / "run.py"), "--steps", str(steps), "--output-dir", str(run_dir),
            f"warmup.cache_dir={tmp_path / 'warmup-cache'}", *SMALL, *ports, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))


def placed(pid: int) -> tuple[str, int]:
    """(Cpus_allowed_list, nice) of a live process."""
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    stat = Path(f"/proc/{pid}/stat").read_text()
    return status["Cpus_allowed_list"].strip(), int(stat[stat.rindex(")") + 2:].split()[16])


def test_run_completes_with_an_actor_killed_midway(tmp_path):
    # weights over gloo: the killed actor's restart joins the learner's sender as a new member;
    # placement: learner on the first CPU, the actor on the last, the evaluator niced
    run_dir = tmp_path / "run"
    cpus = sorted(os.sched_getaffinity(0))
    p = launch(tmp_path, run_dir, steps=6,
               extra=["async.weight_sync=gloo", f"async.weight_sync_addr=127.0.0.1:{free_port()}",
                      f"placement.learner_cpus={cpus[0]}", f"placement.actor_cpus={cpus[-1]}",
                      "placement.evaluator_nice=7"])
    killed = None
    where = {}
    try:
        deadline = time.monotonic() + 600
        while p.poll() is None and time.monotonic() < deadline:  # kill the actor once training is under way
            m = run_dir / "metrics.jsonl"
            if killed is None and m.exists() and len(m.read_text().splitlines()) >= 2:
                pids = procs_mentioning(f"{run_dir}/config.yaml --slot 0")
                learners = learner_workers(run_dir)
                evaluators = procs_mentioning(f"--evaluator --config {run_dir}/config.yaml")
                if pids and learners and evaluators:
                    where = {"actor": placed(min(pids)), "learner": placed(learners[0]),
                             "evaluator": placed(evaluators[0])}
                    killed = min(pids)
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
        out = p.communicate(timeout=60)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:]
    assert killed is not None, "the actor was never seen running"
    assert where["learner"] == (str(cpus[0]), 0) and where["actor"] == (str(cpus[-1]), 0), where
    assert where["evaluator"][1] == 7, where
    assert re.search(r"held-out accuracy: \d+\.\d% -> \d+\.\d% in 6 steps(;|\n)", out), out[-2000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["actor_restarts"] >= 1 and summary["last_policy_version"] == 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["system/transport/received"] >= 6 * 4 and rows[-1]["system/transport/rejected"] == 0
    assert rows[-1]["system/transport/incarnations"] >= 3  # actor, its restart, the evaluator
    # gloo members: the actor and its restart joined (the restart cannot be admitted without
    # newer weights); the evaluator joins only when it first needs weights (version
    # eval.every), which a slow machine may reach after step 6. Lag within η + 1 throughout.
    assert rows[-1]["system/weight_sync/joined_total"] >= 2, rows[-1]
    assert all(r["system/version_lag_max"] <= 1 + 1 for r in rows), [r["system/version_lag_max"] for r in rows]
    assert rows[-1]["system/weight_sync/members"] >= 1
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl", "progress.png", "summary.json",
                 "final/config.json", "final/model.safetensors", "final/tokenizer.json", "sft/config.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*")) and list((run_dir / "tb" / "eval").glob("events.*"))
    assert list((run_dir / "checkpoints").glob("step_*"))
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["policy_version"] == 0 and evals[-1]["policy_version"] == 6

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before, after = load_file(run_dir / "sft" / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    assert set(before) == set(after)
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 0, "the weights did not change"
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    ids = tok.apply_chat_template([{"role": "user", "content": "start 1 add 2"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert model(torch.tensor([list(ids)])).logits.isfinite().all()
    assert not procs_mentioning(str(run_dir)), "processes of the run are still alive"


def test_ctrl_c_leaves_no_process(tmp_path):
    run_dir = tmp_path / "run"
    p = launch(tmp_path, run_dir, steps=50)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and p.poll() is None:
            if len(procs_mentioning(f"{run_dir}/config.yaml")) >= 3 and (run_dir / "metrics.jsonl").exists():
                break
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[0][-3000:]
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and "interrupted" in out, out[-2000:]
    time.sleep(0.5)
    assert not procs_mentioning(str(run_dir)), "processes of the run are still alive"


def test_deterministic_mode_repeats_a_run_exactly(tmp_path):
    """run.deterministic: two runs of the same config and seed print the same summary line
    and log the same losses, rewards and evaluations, value for value (the shared warm-up
    cache makes the second start like the first). The accuracy filter stays on, so which
    groups make a batch is decided by the actor's replay of the learner's intake."""
    outs, rows, evals = [], [], []
    for i in range(2):
        run_dir = tmp_path / f"run{i}"
        p = launch(tmp_path, run_dir, steps=4, extra=["run.deterministic=true", "prime.filter_low=0.1",
                                                     "prime.filter_high=0.9"])
        out = p.communicate(timeout=900)[0]
        assert p.returncode == 0, out[-3000:]
        outs.append(re.search(r"held-out accuracy: .*", out).group(0))
        rows.append([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
        evals.append([json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()])
        assert not list((run_dir / "eval_weights").glob("*")), "the evaluator left evaluation weights behind"
    assert outs[0] == outs[1], outs
    assert [e["policy_version"] for e in evals[0]] == [0, 2, 4]  # exactly every eval.every-th version
    for e0, e1 in zip(*evals):
        assert (e0["policy_version"], e0["accuracy"], e0["greedy_accuracy"]) == \
               (e1["policy_version"], e1["accuracy"], e1["greedy_accuracy"])
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    same = [k for k in rows[0][0] if k.split("/")[0] in ("loss", "reward", "prm", "adv")]
    assert len(same) >= 8, sorted(rows[0][0])
    for r0, r1 in zip(*rows):
        assert {k: r0.get(k) for k in same} == {k: r1.get(k) for k in same}
        assert r0["system/version_lag_max"] <= 1 and r0.get("actor/lockstep_resyncs", 0) == 0


def test_hostile_groups_garbage_and_a_killed_learner_the_run_completes(tmp_path):
    """A rogue client sends schema-valid but unusable groups and raw garbage to a live run;
    the learner rejects and counts them; then its worker is SIGKILLed: launch/run.py restarts
    it from the newest checkpoint, the actor and the evaluator ride through (same processes,
    rejoined as new incarnations) and the run completes every step, with nothing left running."""
    import random

    import zmq
    from synthetic import hostile

    from common.config import load_config
    from common.transport import ActorClient

    run_dir = tmp_path / "run"
    p = launch(tmp_path, run_dir, steps=8, extra=["run.learner_restart_backoff_s=1"])
    metrics = run_dir / "metrics.jsonl"
    rogue, killed, sent = None, None, 0
    ctx = zmq.Context.instance()
    try:
        deadline = time.monotonic() + 600
        while p.poll() is None and time.monotonic() < deadline:
            rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
            if rogue is None and len(rows) >= 1:
                tcfg = load_config(run_dir / "config.yaml").transport
                rogue = ActorClient(tcfg, "rogue").start()
                assert rogue.wait_ready(30)
                for g in hostile(seed=3).values():
                    sent += bool(rogue.send_group(g, timeout=10))
                for addr in (tcfg.trajectory_addr, tcfg.control_addr):
                    s = ctx.socket(zmq.DEALER)
                    s.setsockopt(zmq.LINGER, 2000)  # let the frames go out before close
                    s.connect(addr)
                    for _ in range(5):
                        s.send(random.randbytes(random.randint(1, 300)))
                    s.close()
            if killed is None and rows and rows[-1].get("system/ingest/rejected", 0) >= sent > 0 \
                    and rows[-1].get("system/transport/rejected", 0) > 0 and (run_dir / "checkpoints").exists():
                workers = learner_workers(run_dir)
                if workers:
                    killed = rows[-1]["step"]
                    for pid in workers:
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        out = p.communicate(timeout=120)[0]
    finally:
        if rogue is not None:
            rogue.close(linger_s=0.1)
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:]
    assert killed is not None and killed < 8, "the learner was never killed mid-run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["learner_restarts"] == 1 and summary["last_step"] == 8 and summary["last_policy_version"] == 8
    assert summary["actor_restarts"] == 0  # the actor was not restarted: it rejoined
    logs = {f.name: f.read_text() for f in (run_dir / "logs").glob("*.log")}
    assert sum("rejoined as incarnation" in t for n, t in logs.items() if n.startswith("actor")) == 1, list(logs)
    assert "the learner restarted: rejoined" in logs["evaluator.log"]
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    before = [r for r in rows if r["step"] <= killed][: killed]
    assert before[-1]["system/ingest/rejected"] >= sent == len(hostile(seed=3))
    assert max(r.get("system/transport/rejected", 0) for r in before) > 0  # the garbage, counted
    assert rows[-1]["step"] == 8
    assert "learner exited with" in out and "restart 1/" in out
    versions = [json.loads(x)["policy_version"] for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert versions == sorted(set(versions)) and versions[0] == 0 and versions[-1] == 8  # resumed, none repeated
    time.sleep(0.5)
    assert not procs_mentioning(str(run_dir)), "processes of the run are still alive"


def test_a_stopped_actor_and_a_dead_evaluator_do_not_stop_training(tmp_path):
    """Partitions: the actor SIGSTOPped past the heartbeat timeout is declared dead
    (system/transport/timeouts), comes back on SIGCONT and its groups are accounted (trained,
    or dropped as stale by the rule); the evaluator SIGKILLed mid-run stops nothing. The run
    completes all its steps and leaves nothing running."""
    run_dir = tmp_path / "run"
    p = launch(tmp_path, run_dir, steps=6, extra=["transport.heartbeat_s=0.5", "transport.peer_timeout_s=2"])
    metrics = run_dir / "metrics.jsonl"
    stopped = evaluator_killed = None
    try:
        deadline = time.monotonic() + 600
        while p.poll() is None and time.monotonic() < deadline:
            n = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if evaluator_killed is None and (run_dir / "eval.jsonl").exists():
                pids = procs_mentioning(f"--evaluator --config {run_dir}/config.yaml")
                if pids:
                    evaluator_killed = n
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
            if stopped is None and n >= 2:
                pids = procs_mentioning(f"{run_dir}/config.yaml --slot 0")
                if pids:
                    stopped = n
                    for pid in pids:
                        os.kill(pid, signal.SIGSTOP)
                    time.sleep(2 + 3)  # past peer_timeout_s
                    for pid in pids:
                        os.kill(pid, signal.SIGCONT)
            time.sleep(0.2)
        out = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:]
    assert stopped is not None and evaluator_killed is not None
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["system/transport/timeouts"] >= 1  # the stopped actor was declared dead
    last = rows[-1]
    accounted = sum(last.get(f"system/groups_{k}", 0) for k in ("kept", "stale", "filtered", "truncated")) + \
        last["system/ingest/rejected"]  # a kept group found stale when taken is counted under both
    assert accounted >= last["system/groups_received"] >= 6 * 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["last_policy_version"] == 6 and summary["learner_restarts"] == 0
    time.sleep(0.5)
    assert not procs_mentioning(str(run_dir)), "processes of the run are still alive"


def test_actor_watch_rule():
    """launch.local._ActorWatch by hand: it fires only when every actor is gone, the learner is
    short of its steps and has trained nothing new for the grace period."""
    from launch.local import _ActorWatch

    w = _ActorWatch(num_actors=1, steps=10, grace_s=5.0)
    assert w.stalled(True, 3, now=0.0) is None  # actors alive
    assert w.stalled(False, 3, now=1.0) is None  # gone: the clock starts
    assert w.stalled(False, 3, now=5.9) is None  # within the grace period
    assert w.stalled(False, 4, now=6.5) is None  # the learner trained a buffered step: the clock restarts
    assert w.stalled(False, 4, now=11.0) is None
    msg = w.stalled(False, 4, now=11.6)
    assert msg is not None and "step 4 of 10" in msg
    assert w.stalled(True, 4, now=12.0) is None  # an actor is back (a restart): nothing to say
    assert w.stalled(False, 10, now=100.0) is None and w.stalled(False, 10, now=200.0) is None  # all steps done
    remote = _ActorWatch(num_actors=0, steps=10, grace_s=0.0)  # actors on other hosts
    assert remote.stalled(False, 1, now=0.0) is None and remote.stalled(False, 1, now=50.0) is None


def test_a_run_whose_actors_are_all_gone_stops_with_an_error(tmp_path):
    """The only actor is SIGKILLed with no restarts allowed: the learner would wait for data
    forever; launch/run.py stops the run after run.actors_gone_grace_s with a clear error and
    leaves nothing running."""
    run_dir = tmp_path / "run"
    p = launch(tmp_path, run_dir, steps=40, extra=["actors.max_restarts=0", "run.actors_gone_grace_s=3"])
    metrics = run_dir / "metrics.jsonl"
    killed = None
    try:
        deadline = time.monotonic() + 600
        while p.poll() is None and time.monotonic() < deadline:
            if killed is None and metrics.exists() and metrics.read_text().strip():
                pids = procs_mentioning(f"{run_dir}/config.yaml --slot 0")
                if pids:
                    killed = time.monotonic()
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        out = p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert killed is not None, out[-3000:]
    assert p.returncode == 1, out[-3000:]
    assert "every actor has exited while the learner is at step" in out, out[-3000:]
    assert time.monotonic() - killed < 120  # stopped soon, not at the test's deadline
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert rows[-1]["step"] < 40
    time.sleep(0.5)
    assert not procs_mentioning(str(run_dir)), "processes of the run are still alive"
