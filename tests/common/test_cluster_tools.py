"""launch/keys.py (CURVE key files in one command) and launch/check.py (a config checked for
a multi-host run without training): real key files, a real CURVE-secured ZeroMQ round trip
on 127.0.0.1 with CURVE forced on, real sockets for the bind and reachability checks."""

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.auth

from test_transport import make_group, server_cfg  # noqa: E402

from common.cluster_check import check_cluster, parse_host_port, parse_zmq_tcp, report  # noqa: E402
from common.config import TransportConfig, load_config  # noqa: E402
from common.keys import KeysExistError, write_keys  # noqa: E402
from common.transport import ActorClient, LearnerServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "configs" / "paper-qwen2.5-math-7b.yaml"
TINY = ROOT / "configs" / "tiny.yaml"
pytestmark = pytest.mark.timeout(120)


def errors(findings, field=None):
    return [str(f) for f in findings if f.level == "error" and (field is None or f.field == field)]


def key_overrides(ks):
    return ks.learner_overrides() + ks.actor_overrides()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- keys


def test_write_keys_layout_modes_and_loadable(tmp_path):
    ks = write_keys(tmp_path / "keys")
    for pub, sec in [ks.learner, *ks.actors, ks.evaluator]:
        assert stat.S_IMODE(sec.stat().st_mode) == 0o600, sec
        public, secret = zmq.auth.load_certificate(sec)
        assert secret and zmq.auth.load_certificate(pub) == (public, None)
    assert [p.name for p in ks.actors[0]] == ["actor.key", "actor.key_secret"]
    allowed = zmq.auth.load_certificates(ks.clients_dir)  # what the learner's authenticator reads
    learner_pub = zmq.auth.load_certificate(ks.learner[0])[0]
    assert set(allowed) == {zmq.auth.load_certificate(p)[0] for p in (ks.actors[0][0], ks.evaluator[0])}
    assert learner_pub not in allowed
    assert not [p for p in (tmp_path / "keys").iterdir() if p.name.startswith(".keys-")]  # temp folder gone
    assert (tmp_path / "keys" / ".gitignore").read_text().splitlines()[-1] == "*"  # never committed by accident


def test_write_keys_refuses_overwrite_and_force_rotates(tmp_path):
    out = tmp_path / "keys"
    ks = write_keys(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(KeysExistError, match="--force"):
        write_keys(out)
    with pytest.raises(KeysExistError):
        write_keys(out, actors=3)  # learner.key is there: still refused
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    ks3 = write_keys(out, actors=3, force=True)
    assert ks3.learner[1].read_bytes() != before[ks.learner[1]]
    # the old shared actor key is no longer accepted; the three new ones and the evaluator are
    assert sorted(p.name for p in ks3.clients_dir.iterdir()) == ["actor-0.key", "actor-1.key", "actor-2.key",
                                                                  "evaluator.key"]
    assert ks3.actor_overrides(2)[0] == f"transport.curve_client_secret_key={out / 'actor-2.key_secret'}"


def test_keys_cli_curve_round_trip(tmp_path):
    """launch/keys.py writes the files; the overrides it prints secure a real learner <-> actor
    and learner <-> evaluator round trip (CURVE forced on 127.0.0.1); a second run refuses."""
    out = tmp_path / "keys"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "keys.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("transport.")]
    learner_o, actor_o, evaluator_o = (dict(kv.split("=", 1) for kv in ln.split()) for ln in lines)
    assert set(learner_o) == {"transport.curve_secret_key", "transport.curve_public_keys_dir"}
    assert set(actor_o) == set(evaluator_o) == {"transport.curve_client_secret_key", "transport.curve_server_public_key"}

    def fields(o):
        return {k.split(".", 1)[1]: v for k, v in o.items()}

    srv = LearnerServer(server_cfg(curve_force=True, **fields(learner_o)), max_staleness=1).start()
    clients = []
    try:
        for name, o in (("actor-0", actor_o), ("evaluator", evaluator_o)):
            cfg = TransportConfig(trajectory_addr=srv.trajectory_endpoint, control_addr=srv.control_endpoint,
                                  curve_force=True, heartbeat_s=0.05, **fields(o))
            c = ActorClient(cfg, name).start()
            clients.append(c)
            assert c.wait_ready(10), f"{name}: no CURVE handshake with the learner"
            g = make_group(seed=len(clients))
            assert c.send_group(g, timeout=10)
            env = srv.recv_group(10)
            assert env.body == g and env.actor_id == name
        assert srv.counters()["auth_failures"] == 0
    finally:
        for c in clients:
            c.close(linger_s=0.2)
        srv.close()

    again = subprocess.run([sys.executable, str(ROOT / "launch" / "keys.py"), "--out", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr


# --------------------------------------------------------------------------- check: static


def test_paper_config_after_keys_cli(tmp_path):
    """The paper config with the keys launch/keys.py wrote: the key checks pass, the model
    and data paths that do not exist here are errors naming their fields, exit status 1."""
    ks = write_keys(tmp_path / "keys")
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "check.py"), "--config", str(PAPER),
                        *key_overrides(ks)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "error: model.policy_path: no such directory /models/Eurus-2-7B-SFT" in r.stdout
    assert "error: transport.curve" not in r.stdout
    for field in ("curve_secret_key", "curve_public_keys_dir", "curve_client_secret_key", "curve_server_public_key"):
        assert f"ok: transport.{field}: " in r.stdout


def test_paper_config_on_a_gpu_host_only_paths_fail(tmp_path):
    ks = write_keys(tmp_path / "keys")
    cfg = load_config(PAPER, key_overrides(ks))
    found = check_cluster(cfg, cuda_devices=8)
    assert {f.field for f in found if f.level == "error"} <= {"model.policy_path", "actors.prompts_path",
                                                             "eval.heldout_path"}
    assert errors(found, "model.policy_path")
    assert [f.field for f in found if f.field.startswith("transport.") and f.level != "ok"] == ["transport.run_id"]
    # a transformers directory there: the policy passes
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    found = check_cluster(load_config(PAPER, key_overrides(ks) + [f"model.policy_path={model}"]), cuda_devices=8)
    assert not errors(found, "model.policy_path")
    # the paper config as shipped names key files under keys/, resolved against base
    found = check_cluster(load_config(PAPER), base=tmp_path, cuda_devices=8)
    assert not errors(found, "transport.curve_secret_key")
    assert not errors(found, "transport.curve_client_secret_key")


def test_paper_config_without_keys_names_the_key_fields(tmp_path):
    found = check_cluster(load_config(PAPER), base=tmp_path / "nowhere", cuda_devices=8)
    for field in ("transport.curve_secret_key", "transport.curve_public_keys_dir",
                  "transport.curve_client_secret_key", "transport.curve_server_public_key"):
        assert errors(found, field), field
    assert "launch/keys.py" in errors(found, "transport.curve_secret_key")[0]


def test_check_flags_bad_addresses():
    bad = ["transport.trajectory_addr=tcp://0.0.0.0", "transport.control_addr=ipc:///tmp/x",
           "async.weight_sync=gloo", "async.weight_sync_addr=learner-host"]
    found = check_cluster(load_config(TINY, bad), cuda_devices=0)
    assert "has no host:port" in errors(found, "transport.trajectory_addr")[0]
    assert "needs tcp://HOST:PORT" in errors(found, "transport.control_addr")[0]
    assert "has no host:port" in errors(found, "async.weight_sync_addr")[0]
    for o, field in (("transport.trajectory_addr=tcp://127.0.0.1:*", "transport.trajectory_addr"),
                     ("transport.control_addr=tcp://127.0.0.1:5555", "transport.control_addr"),
                     ("async.weight_sync_addr=10.0.0.5:70000", "async.weight_sync_addr")):
        found = check_cluster(load_config(TINY, ["async.weight_sync=gloo", o]), cuda_devices=0)
        assert errors(found, field), o
    assert parse_zmq_tcp("tcp://[::1]:5555") == ("::1", 5555)
    assert parse_zmq_tcp("tcp://eth0;10.0.0.5:5555") == ("10.0.0.5", 5555)
    assert parse_host_port("learner-0:29555") == ("learner-0", 29555)
    # the shipped one-machine config is fine as it is
    found = check_cluster(load_config(TINY), cuda_devices=0)
    assert not errors(found) and report(found, print_fn=lambda *_: None) == 0
    # several hosts without a run id: warned (another run's actors would be accepted); named: not
    wide = ["transport.trajectory_addr=tcp://0.0.0.0:5555", "transport.control_addr=tcp://0.0.0.0:5556",
            "transport.curve_force=true"]
    warned = lambda f: [x for x in f if x.level == "warn" and x.field == "transport.run_id"]  # noqa: E731
    assert warned(check_cluster(load_config(TINY, wide), cuda_devices=0))
    assert not warned(check_cluster(load_config(TINY, [*wide, "transport.run_id=r1"]), cuda_devices=0))


def test_check_flags_missing_key_file(tmp_path):
    ks = write_keys(tmp_path / "keys")
    missing = tmp_path / "keys" / "nope.key_secret"
    o = key_overrides(ks) + ["transport.trajectory_addr=tcp://0.0.0.0:5555",
                             f"transport.curve_client_secret_key={missing}"]
    found = check_cluster(load_config(TINY, o), cuda_devices=0)
    assert errors(found) == [f"transport.curve_client_secret_key: no such file {missing} (write the keys with launch/keys.py)"]
    # a public key where the secret one belongs, an empty clients folder, a foreign actor key
    (tmp_path / "empty").mkdir()
    other = write_keys(tmp_path / "other")
    o = key_overrides(ks) + ["transport.curve_force=true", f"transport.curve_secret_key={ks.learner[0]}",
                             f"transport.curve_public_keys_dir={tmp_path / 'empty'}"]
    found = check_cluster(load_config(TINY, o), cuda_devices=0)
    assert "holds no secret key" in errors(found, "transport.curve_secret_key")[0]
    assert "no actor could connect" in errors(found, "transport.curve_public_keys_dir")[0]
    o = key_overrides(ks) + ["transport.curve_force=true", f"transport.curve_client_secret_key={other.actors[0][1]}"]
    found = check_cluster(load_config(TINY, o), cuda_devices=0)
    assert "learner would refuse this actor" in errors(found, "transport.curve_client_secret_key")[0]
    o = key_overrides(ks) + ["transport.curve_force=true", f"transport.curve_server_public_key={other.learner[0]}"]
    assert "would fail the handshake" in errors(check_cluster(load_config(TINY, o), cuda_devices=0),
                                                "transport.curve_server_public_key")[0]


def test_check_nccl_and_cuda_device_on_a_cpu_host():
    o = ["async.weight_sync=nccl", "async.weight_sync_addr=127.0.0.1:29555", "run.device=cuda",
         "actors.gpus=0,1", "actors.learner_gpus=2,3"]
    found = check_cluster(load_config(TINY, o), cuda_devices=0)
    assert "nccl needs CUDA, and this host has no CUDA device" in errors(found, "async.weight_sync")[0]
    assert errors(found, "run.device")
    found = check_cluster(load_config(TINY, o), cuda_devices=4, nproc_per_node=2)
    assert not errors(found)
    found = check_cluster(load_config(TINY, o), cuda_devices=2, nproc_per_node=4)
    assert any("GPU(s) [2, 3] do not exist here" in e for e in errors(found, "actors.learner_gpus"))
    assert any("for 4 learner ranks" in e for e in errors(found, "actors.learner_gpus"))
    # the real device count of this host (torch.cuda), not one given by the test
    real = check_cluster(load_config(TINY, o[:1]))
    import torch

    assert bool(errors(real, "async.weight_sync")) == (not torch.cuda.is_available())


# --------------------------------------------------------------------------- check: network


def test_check_actor_unreachable_endpoints():
    ports = [closed_port() for _ in range(3)]
    o = [f"transport.trajectory_addr=tcp://127.0.0.1:{ports[0]}", f"transport.control_addr=tcp://127.0.0.1:{ports[1]}",
         "async.weight_sync=gloo", f"async.weight_sync_addr=127.0.0.1:{ports[2]}"]
    found = check_cluster(load_config(TINY, o), "actor", timeout_s=1.0)
    assert errors(found, "async.weight_sync_addr") == [
        f"async.weight_sync_addr: cannot reach 127.0.0.1:{ports[2]} (connection refused)"]
    assert errors(found, "transport.trajectory_addr") == [
        f"transport.trajectory_addr: cannot reach 127.0.0.1:{ports[0]} (connection refused)"]
    assert errors(found, "transport.control_addr")
    # the same through the command line, with --reach
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "check.py"), "--config", str(TINY), "--reach", "127.0.0.1",
                        "--timeout", "1", *o], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"error: async.weight_sync_addr: cannot reach 127.0.0.1:{ports[2]} (connection refused)" \
        in r.stdout, r.stdout + r.stderr


def test_check_actor_reaches_a_live_learner(tmp_path):
    """A live CURVE learner (forced on 127.0.0.1) and a listener standing in for the
    weight-sync store: reachability passes, with a CURVE handshake; a foreign key is refused."""
    ks = write_keys(tmp_path / "keys")
    lo = dict(kv.split("=", 1) for kv in ks.learner_overrides())
    srv = LearnerServer(server_cfg(curve_force=True, **{k.split(".", 1)[1]: v for k, v in lo.items()}),
                        max_staleness=1).start()
    store = socket.socket()
    store.bind(("127.0.0.1", 0))
    store.listen()
    try:
        o = key_overrides(ks) + [f"transport.trajectory_addr={srv.trajectory_endpoint}",
                                 f"transport.control_addr={srv.control_endpoint}", "transport.curve_force=true",
                                 "async.weight_sync=gloo", f"async.weight_sync_addr=127.0.0.1:{store.getsockname()[1]}"]
        found = check_cluster(load_config(TINY, o), "actor", timeout_s=5.0)
        assert not errors(found), errors(found)
        oks = [str(f) for f in found if f.level == "ok"]
        assert sum("ZeroMQ handshake with CURVE accepted" in m for m in oks) == 2, oks
        assert any(m.startswith("async.weight_sync_addr: reached 127.0.0.1:") for m in oks)
        other = write_keys(tmp_path / "other")
        found = check_cluster(load_config(TINY, o[:2] + o[4:] + other.actor_overrides()[:1]), "actor", timeout_s=5.0)
        refused = errors(found, "transport.curve_client_secret_key")
        assert refused and "refused this key" in refused[0], errors(found)
    finally:
        store.close()
        srv.close()


def test_check_learner_binds(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    free = [closed_port() for _ in range(3)]
    try:
        o = [f"transport.trajectory_addr=tcp://127.0.0.1:{port}", f"transport.control_addr=tcp://127.0.0.1:{free[0]}",
             "async.weight_sync=gloo", f"async.weight_sync_addr=127.0.0.1:{free[1]}"]
        found = check_cluster(load_config(TINY, o), "learner")
        assert errors(found) == [f"transport.trajectory_addr: cannot bind tcp://127.0.0.1:{port} "
                                 "(address already in use: is a learner already running?)"]
        o = o[1:3] + [f"transport.trajectory_addr=tcp://127.0.0.1:{free[2]}", f"async.weight_sync_addr=127.0.0.1:{port}"]
        assert "cannot bind port" in errors(check_cluster(load_config(TINY, o), "learner"), "async.weight_sync_addr")[0]
        o = o[:3] + [f"async.weight_sync_addr=192.0.2.1:{free[1]}"]  # TEST-NET: not this machine
        assert "not an address of this machine" in errors(check_cluster(load_config(TINY, o), "learner"),
                                                          "async.weight_sync_addr")[0]
    finally:
        busy.close()


def test_run_py_check_one_machine():
    p1, p2 = closed_port(), closed_port()
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--check",
                        f"transport.trajectory_addr=tcp://127.0.0.1:{p1}", f"transport.control_addr=tcp://127.0.0.1:{p2}"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "can be bound here" in r.stdout and "ready (" in r.stdout
