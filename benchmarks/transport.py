"""Throughput of the trajectory channel: the real path against raw ZeroMQ, in one run.

    .venv/bin/python benchmarks/transport.py [--groups N] [--rounds R] [--k 4] [--tokens 1000]

real: an ActorClient in a child process sends realistic TrajectoryGroups (K responses of
~``--tokens`` tokens, with behaviour log-probs and per-token versions) under credit to a
LearnerServer in this process: Envelope + msgpack encode + send under credit; receive +
typed decode with every check of ``common.schema`` (log-probs vectorised) + seq/credit
accounting, credit top-ups flowing back on the same connection, heartbeats on the control
channel. (The sender does not repeat the receiver's checks: ``validate_on_send`` is off,
as in the actor.)
raw: a plain DEALER in a child process sends byte strings of the same sizes (the encoded
envelopes themselves) to a plain ROUTER here, which only receives them.
Both use the same socket types on 127.0.0.1 TCP and read frames the same way; each round
runs both paths back to back (order alternating), timed at the receiver over ``--groups``
messages after a warm-up. Per path: the median rate; the headline ``ratio R`` on the last
line is the median over rounds of real/raw within a round (the load of other jobs on a
shared machine cancels within a pair). Per round it also prints CPU per group, receiver
(its Python thread and ZeroMQ I/O thread) and sender, which is where the gap shows.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from common.config import TransportConfig  # noqa: E402
from common.schema import Int32Vector, Response, TrajectoryGroup, encode, make_envelope  # noqa: E402
from common.transport import ActorClient, LearnerServer  # noqa: E402

WARMUP = 200


def make_group(k: int, tokens: int, seed: int = 0) -> TrajectoryGroup:
    rng = np.random.default_rng(seed)
    responses = []
    for i in range(k):
        t = int(tokens * rng.uniform(0.9, 1.1))
        responses.append(Response.from_numpy(
            token_ids=rng.integers(0, 151_000, t),
            behav_logp=np.log(rng.uniform(1e-3, 1.0, t)).astype(np.float32),
            policy_version=np.full(t, 7, dtype=np.int32),
            finish_reason="stop" if i else "length",
            outcome_reward=float(i % 2),
            verifier_status="correct" if i % 2 else "wrong"))
    return TrajectoryGroup(prompt_id="bench-0", prompt_tokens=Int32Vector.from_numpy(rng.integers(0, 151_000, 256)),
                           responses=responses, policy_version=7, gen_s=12.5, verify_s=0.4)


def payload(args) -> bytes:
    return encode(make_envelope(make_group(args.k, args.tokens), "bench-actor", "0" * 32, 0))


# ----------------------------------------------------------------------- senders


def sender_raw(args):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(args.traj)
    data = payload(args)
    c0, t0 = time.process_time(), time.thread_time()
    for _ in range(args.groups + WARMUP):
        s.send(data)
    t1 = time.thread_time()
    s.close(linger=-1)
    ctx.term()
    print(f"sender: thread cpu {(t1 - t0) / (args.groups + WARMUP) * 1e6:.1f} us/msg", file=sys.stderr)
    print(f"sender-cpu {time.process_time() - c0}", flush=True)


def sender_real(args):
    cfg = TransportConfig(trajectory_addr=args.traj, control_addr=args.ctrl, credit_window=args.window)
    group = make_group(args.k, args.tokens)
    c0 = time.process_time()
    with ActorClient(cfg, "bench-actor") as client:
        t0 = time.thread_time()
        for _ in range(args.groups + WARMUP):
            client.send_group(group)
        t1 = time.thread_time()
        c = client.counters()
    print(f"sender: thread cpu {(t1 - t0) / (args.groups + WARMUP) * 1e6:.1f} us/msg {c}", file=sys.stderr)
    print(f"sender-cpu {time.process_time() - c0}", flush=True)


def spawn(role, args, traj, ctrl=""):
    cmd = [sys.executable, __file__, "--role", role, "--traj", traj, "--ctrl", ctrl, "--groups", str(args.groups),
           "--k", str(args.k), "--tokens", str(args.tokens), "--window", str(args.window)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def _threads_cpu() -> dict:
    """CPU seconds per thread of this process (Linux /proc), by thread name."""
    out = {}
    tck = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tck)
    return out


def _io_cpu(before: dict, after: dict) -> float:
    return sum(a[1] - before.get(t, (None, 0.0))[1] for t, a in after.items() if a[0].startswith("ZMQbg"))


def _sender_cpu(proc) -> float:
    out, _ = proc.communicate()
    return float(out.split("sender-cpu")[-1])


# --------------------------------------------------------------------- receivers


def run_raw(args, size):
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.bind("tcp://127.0.0.1:*")
    proc = spawn("raw", args, r.getsockopt_string(zmq.LAST_ENDPOINT))
    nbytes = 0
    recv = r.recv  # [routing id, payload], read the cheapest way pyzmq offers (as the real path does)
    for _ in range(WARMUP):
        recv()
        recv(copy=False)
    t0, c0, th0, p0 = time.perf_counter(), time.process_time(), time.thread_time(), _threads_cpu()
    for _ in range(args.groups):
        recv()
        nbytes += len(recv(copy=False))
    dt, rcpu, rth, p1 = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - th0, _threads_cpu()
    cpu = rcpu / args.groups, rth / args.groups, _io_cpu(p0, p1) / args.groups, _sender_cpu(proc) / (args.groups + WARMUP)
    r.close(linger=0)
    ctx.term()
    assert nbytes == size * args.groups
    return args.groups / dt, nbytes / dt, cpu


def run_real(args, size):
    cfg = TransportConfig(trajectory_addr="tcp://127.0.0.1:*", control_addr="tcp://127.0.0.1:*",
                          credit_window=args.window)
    with LearnerServer(cfg, max_staleness=1, credit_window=args.window) as srv:
        proc = spawn("real", args, srv.trajectory_endpoint, srv.control_endpoint)

        def recv():
            env = srv.recv_group(30)
            if env is None:
                raise RuntimeError(f"no group for 30 s: {srv.counters()} {srv.actor_info()}")
            return env

        for _ in range(WARMUP):
            recv()
        nbytes = 0
        t0, c0, th0, p0 = time.perf_counter(), time.process_time(), time.thread_time(), _threads_cpu()
        for _ in range(args.groups):
            env = recv()
            nbytes += size  # each envelope encodes to this size, +0-2 bytes for the seq
        dt, rcpu, rth, p1 = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - th0, _threads_cpu()
        assert env is not None and env.seq == args.groups + WARMUP - 1
        while proc.poll() is None:  # read its Goodbye so that it can leave at once
            srv.recv_group(0.05)
        cpu = rcpu / args.groups, rth / args.groups, _io_cpu(p0, p1) / args.groups, _sender_cpu(proc) / (args.groups + WARMUP)
        c = srv.counters()
    assert c["received"] == args.groups + WARMUP and c["rejected"] == 0 and c["lost"] == 0, c
    return args.groups / dt, nbytes / dt, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=4000, help="timed messages per round and path")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--k", type=int, default=4, help="responses per group")
    ap.add_argument("--tokens", type=int, default=1000, help="mean tokens per response")
    ap.add_argument("--window", type=int, default=256,
                    help="credit window (a throughput setting; runs default to transport.credit_window=8)")
    ap.add_argument("--role", choices=["raw", "real"], help=argparse.SUPPRESS)
    ap.add_argument("--traj", help=argparse.SUPPRESS)
    ap.add_argument("--ctrl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "raw":
        return sender_raw(args)
    if args.role == "real":
        return sender_real(args)

    size = len(payload(args))
    print(f"group: K={args.k}, ~{args.tokens} tokens/response, {size} bytes encoded; "
          f"{args.groups} timed messages x {args.rounds} rounds per path, credit window {args.window}")
    rates = {"raw": [], "real": []}
    for i in range(args.rounds):
        order = (("raw", run_raw), ("real", run_real))
        for mode, fn in (order if i % 2 == 0 else order[::-1]):  # alternate: drift hits both
            g, b, (rcpu, rth, rio, scpu) = fn(args, size)
            rates[mode].append((g, b))
            print(f"round {i}: {mode:4s} {g:8.0f} groups/s {b / 1e6:8.1f} MB/s   cpu/group: receiver {rcpu * 1e6:4.0f} us "
                  f"(python {rth * 1e6:3.0f}, zmq io {rio * 1e6:3.0f}), sender {scpu * 1e6:4.0f} us", flush=True)
    med = {m: (statistics.median(g for g, _ in v), statistics.median(b for _, b in v)) for m, v in rates.items()}
    pairs = [r[0] / w[0] for r, w in zip(rates["real"], rates["raw"])]
    print(f"per-round real/raw: {' '.join(f'{x:.2f}' for x in pairs)}; "
          f"ratio of the median rates {med['real'][0] / med['raw'][0]:.2f}")
    # the headline: the median of the per-round ratios, each taken from two back-to-back
    # runs, so that the load of other jobs on the machine cancels as far as it can
    print(f"median: real {med['real'][0]:.0f} groups/s {med['real'][1] / 1e6:.1f} MB/s; "
          f"raw {med['raw'][0]:.0f} groups/s {med['raw'][1] / 1e6:.1f} MB/s; ratio {statistics.median(pairs):.2f}")


if __name__ == "__main__":
    main()
