"""Does the learner's intake hold many actors? The real LearnerServer + Ingest fed by N processes.

    .venv/bin/python benchmarks/scaling.py [--actors 1,4,16,64] [--rate 200] [--seconds 20]
        [--batch 32] [--eta 1] [--k 4] [--tokens 64] [--port 5755] [--broadcast 1,2,4,8] [--mb 64]

Per N (one after another): this process is the learner's intake, a real ``LearnerServer``
(ZeroMQ, both channels, every schema check) and a real ``Ingest`` (validation, accuracy
filter, staleness backstop, AReaL's capacity admission with ``groups_per_step`` = --batch).
It takes --batch groups per learner "step" as fast as they come, then advances the policy
version and publishes it (no training: the intake is what is measured). N load-generating
actor processes (``--role actor``: a real ``ActorClient`` each, no torch) offer the same total
load, --rate groups/s split evenly (an open-loop pacer per actor), each group schema-valid
(K responses of ~--tokens tokens, mixed outcomes so the filter keeps it, versions = the
newest the actor has heard of). An actor starts a group only when admitted (staleness and
capacity rule), reports its starts by heartbeat like a real actor, and sends under credit.

Measured over --seconds after a warm-up of a quarter of that:
- accepted groups/s: groups the Ingest kept, per second of the window;
- fairness: Jain's index (Σx)² / (N·Σx²) over the actors' received groups and over their
  credits granted (1 = perfectly even);
- admission: the largest excess, over the run, of the groups received by a version v over
  the capacity bound (η + v + 1)·B (0 = never over; with several actors heartbeat lag may
  let them overshoot briefly), and the groups dropped as stale (the backstop's work);
- control-plane latency: from each heartbeat to the next Credit the actor receives
  (``ActorClient.heartbeat_rtts``), median and p99 over all actors.
Weight broadcast (``--broadcast 1,2,4,8``, first): the real gloo sender (``make_sender``, the
learner's) and R receiving processes (``make_receiver``, the actors'), a state dict of --mb MB;
per R the median over --reps updates of the sender's ``send`` (pack, transfer to every
receiver, their checksum verify and ack), after one untimed update (the joins). Printed with
t(R) / t(1) and the growth exponent log(t(R_max)/t(1)) / log(R_max) (1 = linear, 0 = flat).

The last line reads ``ratio R`` = accepted groups/s at the largest N over at the smallest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

import numpy as np  # noqa: E402


def jain(xs) -> float:
    """Jain's fairness index of non-negative amounts: (Σx)² / (n·Σx²); 1 = even, 1/n = one takes all."""
    x = np.asarray(list(xs), dtype=np.float64)
    if x.size == 0 or float((x * x).sum()) == 0.0:
        return 1.0
    return float(x.sum() ** 2 / (x.size * (x * x).sum()))


def admission_excess(received_by_version: dict[int, int], eta: int, batch: int) -> int:
    """Largest (groups received while the learner was at version v) − (η + v + 1)·B over v;
    ``received_by_version``: cumulative groups received when version v ended."""
    return max((n - (eta + v + 1) * batch for v, n in received_by_version.items()), default=0)


def make_group(rng, k: int, tokens: int, version: int):
    from common.schema import Int32Vector, Response, TrajectoryGroup

    responses = []
    for i in range(k):
        t = int(tokens * rng.uniform(0.75, 1.0))
        responses.append(Response.from_numpy(
            token_ids=rng.integers(5, 1000, t), behav_logp=np.log(rng.uniform(0.05, 1.0, t)).astype(np.float32),
            policy_version=version, finish_reason="stop", outcome_reward=float(i % 2),
            verifier_status="correct" if i % 2 else "wrong"))
    return TrajectoryGroup(prompt_id=f"p{int(rng.integers(1 << 30))}",
                           prompt_tokens=Int32Vector.from_numpy(rng.integers(5, 1000, 24)),
                           responses=responses, policy_version=version, gen_s=0.1, verify_s=0.01)


# ------------------------------------------------------------------ load-generating actor


def actor_main(args) -> None:
    """One load-generating actor: paced, admitted, credited sends until the learner's Shutdown;
    prints one JSON line (its counters and heartbeat round trips)."""
    from common.config import TransportConfig
    from common.transport import ActorClient, ShutdownRequested

    cfg = TransportConfig(trajectory_addr=args.traj, control_addr=args.ctrl, heartbeat_s=args.heartbeat_s)
    rng = np.random.default_rng(args.seed)
    interval = 1.0 / args.actor_rate
    started = sent = 0
    with ActorClient(cfg, args.actor_id) as c:
        c.wait_ready(timeout=60)
        next_t = time.monotonic()
        while not c.shutdown_requested:
            now = time.monotonic()
            if now < next_t:
                time.sleep(next_t - now)
            next_t = max(next_t + interval, time.monotonic() - 1.0)  # open loop, at most 1 s of backlog
            if not c.wait_admit_room(started, timeout=1.0):
                continue
            version = c.learner_version or 0
            if not c.admitted(version):
                continue
            started += 1
            c.set_state(policy_version=version, groups_started=started, in_flight=1)
            try:
                if c.send_group(make_group(rng, args.k, args.tokens, version), timeout=5.0):
                    sent += 1
            except ShutdownRequested:
                break
            c.set_state(in_flight=0)
        rtts = c.heartbeat_rtts()
    print(json.dumps({"actor": args.actor_id, "started": started, "sent": sent, "rtts": rtts}), flush=True)


# ------------------------------------------------------------------ weight broadcast


def receiver_main(args) -> None:
    """One receiving process: takes --reps + 1 updates, then leaves."""
    from common.weight_sync import make_receiver

    r = make_receiver("gloo", addr=args.addr, timeout_s=300, connect_timeout_s=300, threads=1, label=args.actor_id)
    try:
        for _ in range(args.reps + 1):
            r.receive(timeout_s=300)
    finally:
        r.close()


def broadcast_case(n: int, args) -> dict:
    import torch

    from common.weight_sync import make_sender

    numel = int(args.mb * (1 << 20)) // 4 // 8
    state = {f"layer{i}.weight": torch.randn(numel) for i in range(8)}
    sender = make_sender("gloo", addr=f"127.0.0.1:{args.port + 2 if args.port else 0}", num_receivers=n,
                         timeout_s=300, connect_timeout_s=300, threads=1)
    addr = sender.addr  # the port the store bound (any free one when --port 0)
    procs = [subprocess.Popen([sys.executable, __file__, "--role", "receiver", "--addr", addr, "--reps",
                               str(args.reps), "--actor-id", f"recv-{i}"]) for i in range(n)]
    times = []
    try:
        for v in range(1, args.reps + 2):
            t = time.perf_counter()
            sender.send(state, v)
            times.append(time.perf_counter() - t)
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        sender.close()
    med = statistics.median(times[1:])
    return {"receivers": n, "mb": args.mb, "send_s": med, "all_s": times}


# ------------------------------------------------------------------ the learner's intake


def run_case(n: int, args) -> dict:
    from common.config import TransportConfig
    from common.transport import LearnerServer
    from common.admission import AdmissionRule
    from learner.ingest import GroupLimits, Ingest

    traj, ctrl = ((f"tcp://127.0.0.1:{args.port}", f"tcp://127.0.0.1:{args.port + 1}") if args.port
                  else ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*"))
    cfg = TransportConfig(trajectory_addr=traj, control_addr=ctrl, heartbeat_s=args.heartbeat_s,
                          peer_timeout_s=max(10.0, 5 * args.heartbeat_s))
    server = LearnerServer(cfg, max_staleness=args.eta).start()
    traj, ctrl = server.trajectory_endpoint, server.control_endpoint  # what was bound
    ingest = Ingest(server, AdmissionRule(eta=args.eta, groups_per_step=args.batch), 0.2, 0.8,
                    limits=GroupLimits(k=args.k, max_prompt_tokens=64, max_tokens=args.tokens, vocab_size=1000))
    ingest.update_admission()
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--role", "actor", "--actor-id", f"load-{i}", "--traj", traj, "--ctrl", ctrl,
         "--actor-rate", str(args.rate / n), "--k", str(args.k), "--tokens", str(args.tokens),
         "--heartbeat-s", str(args.heartbeat_s), "--seed", str(i)],
        stdout=subprocess.PIPE, text=True) for i in range(n)]
    try:
        deadline = time.monotonic() + 300  # 64 processes importing on 2 cores take a while
        while len(server.alive_actors()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(server.alive_actors())} of {n} actors joined in 300 s")
            time.sleep(0.05)
        version, received_at = 0, {}
        warm = args.seconds / 4
        t_start = time.monotonic()
        t0 = kept0 = None
        while True:
            now = time.monotonic()
            if t0 is None and now - t_start >= warm:
                t0, kept0 = now, ingest.counts["kept"]
            if t0 is not None and now - t0 >= args.seconds:
                break
            batch, _ = ingest.next_batch(args.batch, version, poll_s=0.05,
                                         should_stop=lambda: time.monotonic() - t_start > warm + args.seconds)
            received_at[version] = ingest.counts["received"]
            if len(batch) == args.batch:
                version += 1
                server.publish_policy(version, "shm", f"bench-v{version}")
                ingest.update_admission()
        elapsed = time.monotonic() - t0
        accepted = ingest.counts["kept"] - kept0
        info = server.actor_info()
        counts = dict(ingest.counts)
        transport = server.counters()
        server.shutdown("benchmark done")
        outs = [json.loads(p.communicate(timeout=60)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.close()
    rtts = sorted(r for o in outs for r in o["rtts"])
    return {
        "actors": n, "offered_groups_per_s": args.rate, "accepted_groups_per_s": accepted / elapsed,
        "versions": version, "fairness_received": jain(i["received"] for i in info.values()),
        "fairness_credits": jain(i["granted_total"] for i in info.values()),
        "admission_excess": admission_excess(received_at, args.eta, args.batch),
        "stale": counts.get("stale", 0), "filtered": counts.get("filtered", 0), "received": counts.get("received", 0),
        "rejected": sum(ingest.rejected.values()), "lost": transport["lost"],
        "rtt_median_ms": 1e3 * statistics.median(rtts) if rtts else None,
        "rtt_p99_ms": 1e3 * rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))] if rtts else None,
        "started": sum(o["started"] for o in outs), "sent": sum(o["sent"] for o in outs),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", default="1,4,16,64", help="comma-separated actor counts [processes]")
    ap.add_argument("--rate", type=float, default=200.0, help="offered load, all actors together [groups/s]")
    ap.add_argument("--seconds", type=float, default=20.0, help="measurement window per case [s]")
    ap.add_argument("--batch", type=int, default=32, help="groups per learner step (B) [groups]")
    ap.add_argument("--eta", type=int, default=1, help="staleness bound [policy versions]")
    ap.add_argument("--k", type=int, default=4, help="responses per group")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per response (at most) [tokens]")
    ap.add_argument("--heartbeat-s", type=float, default=0.5, help="actor heartbeat period [s]")
    ap.add_argument("--port", type=int, default=5755, help="trajectory port; control = port + 1, broadcast store = port + 2; 0 = any free ports")
    ap.add_argument("--broadcast", default="1,2,4,8",
                    help="comma-separated receiver counts for the weight broadcast ('' = skip) [processes]")
    ap.add_argument("--mb", type=float, default=64.0, help="state dict size of the broadcast [MB]")
    ap.add_argument("--reps", type=int, default=5, help="timed updates per receiver count")
    ap.add_argument("--output", help="write the figures here (JSON)")
    ap.add_argument("--role", default="intake", choices=["intake", "actor", "receiver"], help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--actor-id", help=argparse.SUPPRESS)
    ap.add_argument("--traj", help=argparse.SUPPRESS)
    ap.add_argument("--ctrl", help=argparse.SUPPRESS)
    ap.add_argument("--actor-rate", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "actor":
        actor_main(args)
        return {}
    if args.role == "receiver":
        receiver_main(args)
        return {}
    bcast = []
    if args.broadcast:
        print(f"weight broadcast over gloo, {args.mb:g} MB, median of {args.reps} updates", flush=True)
        print("| receivers | send s | t(R) / t(1) | MB/s delivered in all |\n|---:|---:|---:|---:|", flush=True)
        for n in (int(x) for x in args.broadcast.split(",")):
            b = broadcast_case(n, args)
            bcast.append(b)
            print(f"| {n} | {b['send_s']:.3f} | {b['send_s'] / bcast[0]['send_s']:.2f} | "
                  f"{n * args.mb / b['send_s']:.0f} |", flush=True)
        if len(bcast) > 1:
            growth = (np.log(bcast[-1]["send_s"] / bcast[0]["send_s"])
                      / np.log(bcast[-1]["receivers"] / bcast[0]["receivers"]))
            print(f"broadcast growth exponent {growth:.2f} (1 = linear in the receivers, 0 = flat)", flush=True)
    ns = [int(x) for x in args.actors.split(",")]
    rows = []
    print(f"offered load {args.rate:g} groups/s in all, B = {args.batch}, η = {args.eta}, "
          f"{args.seconds:g} s per case", flush=True)
    print("| actors | accepted groups/s | versions | fairness (received / credits) | admission excess | stale "
          "| heartbeat→credit median / p99 ms |", flush=True)
    print("|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for n in ns:
        r = run_case(n, args)
        rows.append(r)
        rtt = (f"{r['rtt_median_ms']:.1f} / {r['rtt_p99_ms']:.1f}" if r["rtt_median_ms"] is not None else "-")
        print(f"| {n} | {r['accepted_groups_per_s']:.1f} | {r['versions']} | {r['fairness_received']:.3f} / "
              f"{r['fairness_credits']:.3f} | {r['admission_excess']} | {r['stale']} | {rtt} |", flush=True)
    ratio = rows[-1]["accepted_groups_per_s"] / max(rows[0]["accepted_groups_per_s"], 1e-9)
    out = {"cases": rows, "broadcast": bcast, "ratio": ratio, "args": {k: v for k, v in vars(args).items() if k != "role"}}
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"accepted groups/s at {ns[-1]} actors over at {ns[0]}: ratio {ratio:.3f}", flush=True)
    return out


if __name__ == "__main__":
    main()
