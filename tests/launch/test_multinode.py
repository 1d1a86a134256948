"""The README's split form on loopback "hosts": the learner as two torchrun nodes (one rank
each, two agents on a c10d rendezvous at 127.0.0.1), two actors started separately by
``launch/actors.py``, CURVE on (keys from ``launch/keys.py``), weights over gloo.

Checked: 4 steps run to the end; versions 1..4; both actors joined the weight sync and
delivered groups; no group rejected; with η = 0 the actors' behaviour log-probs match the
learner's recomputation after every weight update (``loss/mismatch_kl`` < 1e-6; stale or
garbled weights make it ~1e-2); every process exits.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from synthetic import free_port

ROOT = Path(__file__).resolve().parents[2]

SMALL = ["task.sft_size=300", "task.train_size=256", "task.dev_size=16", "task.heldout_size=16",
         "warmup.hidden_size=64", "warmup.heads=2", "warmup.intermediate_size=128", "warmup.layers=2",
         "warmup.max_steps=10", "warmup.eval_every=10"]
RUN = ["generation.engine=hf", "generation.max_tokens=48", "batch.prompts_per_step=4", "batch.policy_mini_batch=16",
       "batch.prm_mini_batch=16", "prime.filter_low=0.0", "prime.filter_high=1.0", "eval.every=0",
       "checkpoint.every=0", "logging.console=false", "actors.threads=1",
       "async.max_staleness=0"]  # on-policy: every token sampled by the newest weights the actors received


def test_two_learner_nodes_two_separate_actors_curve_and_gloo(tmp_path):
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # the starting policy and the prompt files (what launch/run.py's warm-up step makes)
    model_dir = tmp_path / "policy"
    subprocess.run([py, "launch/warmup.py", "--output", str(model_dir), f"warmup.cache_dir={tmp_path / 'cache'}",
                    *SMALL], cwd=ROOT, check=True, capture_output=True, env=env, timeout=600)
    data = model_dir / "data"
    keys = subprocess.run([py, "launch/keys.py", "--out", str(tmp_path / "keys")], cwd=ROOT, check=True,
                          capture_output=True, text=True, env=env).stdout
    learner_keys = [w for w in keys.split() if w.startswith(("transport.curve_secret_key=",
                                                             "transport.curve_public_keys_dir="))]
    actor_keys = [w for w in keys.split() if w.startswith(("transport.curve_client_secret_key=",
                                                           "transport.curve_server_public_key="))]
    assert len(learner_keys) == 2 and len(actor_keys) >= 2, keys
    actor_keys = actor_keys[:2]
    run_dir = tmp_path / "run"
    common = [f"model.policy_path={model_dir}", f"actors.prompts_path={data / 'train.jsonl'}",
              f"run.output_dir={run_dir}", "run.steps=4", "transport.curve_force=true",
              f"transport.trajectory_addr=tcp://127.0.0.1:{free_port()}",
              f"transport.control_addr=tcp://127.0.0.1:{free_port()}",
              "async.weight_sync=gloo", f"async.weight_sync_addr=127.0.0.1:{free_port()}", *RUN]
    rdzv = f"127.0.0.1:{free_port()}"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = {}

    def spawn(name, argv):
        with open(logs / f"{name}.log", "wb") as out:
            procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)

    try:
        for node in (0, 1):
            spawn(f"learner-node{node}", [py, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                                          "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv,
                                          "--rdzv-id", "split-test", "launch/learner.py", *common, *learner_keys])
        spawn("actors", [py, "launch/actors.py", "actors.num=2", *common, *actor_keys])
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and any(procs[f"learner-node{n}"].poll() is None for n in (0, 1)):
            time.sleep(0.5)
        rcs = {n: p.poll() for n, p in procs.items()}

        def tail(name):
            return (logs / f"{name}.log").read_text(errors="replace")[-3000:]

        assert rcs["learner-node0"] == 0 and rcs["learner-node1"] == 0, (rcs, tail("learner-node0"), tail("actors"))
        procs["actors"].wait(timeout=120)  # the learner's Shutdown ends the actors
        assert procs["actors"].returncode == 0, tail("actors")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4]
    last = rows[-1]
    assert last["system/transport/rejected"] == 0 and last["system/transport/received"] >= 4 * 4
    assert last["system/weight_sync/joined_total"] >= 2 and last["system/weight_sync/members"] == 2, last
    assert last["system/weight_sync/receivers"] == 2 and last["system/weight_sync/failed"] == 0
    assert last["actor/count"] == 2
    # η = 0: steps 2-4 train on tokens sampled with weights that came over gloo; the engines'
    # behaviour log-probs equal the learner's recomputation (wrong weights: KL ~1e-2 and up)
    assert all(r["system/version_lag_max"] == 0 for r in rows)
    for r in rows:
        assert r["loss/mismatch_kl"] < 1e-6, [x["loss/mismatch_kl"] for x in rows]
