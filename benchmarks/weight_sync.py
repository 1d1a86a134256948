"""Seconds to deliver a model's weights from a sender to ONE receiving process, per weight-sync
backend that runs on a CPU machine (gloo, shm), each next to its bound measured in the same run:
gloo against the same bytes over a plain TCP socket between the same two processes, shm against
a plain in-process memory copy.

    .venv/bin/python benchmarks/weight_sync.py [--backends gloo,tcp,tcp-fresh,shm] [--reps 5]
                                                [--bucket-mb 512] [--threads 1] [--layers N]

The model defaults to the SmolLM2-135M shape (LlamaConfig hidden 576, 30 layers, vocab 49152,
tied embeddings: 134.5M fp32 parameters, 538 MB, random values); ``--layers`` makes it smaller.

gloo vs TCP (``--backends gloo,tcp``): the sender (``make_sender("gloo", num_receivers=1)``) is
this process; one spawned child holds the receiver (``make_receiver("gloo")``, which takes
every update in its background thread and verifies the checksums before acknowledging) and a
plain TCP socket on 127.0.0.1. A gloo round times one ``send(state, v)`` call in the sender:
pack (copy into the buckets + checksum) + transfer + the receiver's verify + its ack; its
``SyncStats.transfer_s`` is the part after packing (bucket broadcasts, then waiting for the
ack, so the receiver's verify is in it); the receiver's own ``transfer_s`` (broadcasts only,
from when it saw the header) and ``pack_s`` (its checksum verify) are shown below it. A TCP
round times, in the sender, one ``sendall`` of a packed buffer of the same bytes (after a
16-byte length/mode prefix) until a 1-byte ack from the child, which ``recv_into``-s a
preallocated, already touched numpy buffer: the link bound.
``tcp-fresh`` does the same into a fresh ``torch.empty`` buffer per update, as the gloo
receiver allocates its buckets: the difference is the receiving side's first-touch page faults.
Rounds interleave (gloo, TCP, TCP, gloo, ...: the order flips each round) so machine noise
hits both; one warm-up round first (gloo's includes the join; shown apart). ``--bucket-mb
64,512`` runs one gloo sender/receiver pair per bucket size in the same interleaving.
Headlines: ``TCP s / gloo send() s`` (end-to-end) and ``TCP s / gloo transfer_s``
(transfer only), medians over ``--reps`` rounds; 1.0 = as fast as plain TCP. The whole default
run (538 MB, 5 rounds, shm included) takes about 50 s on the project's 2-core machine.

shm (``--backends shm``): delivery time = from the start of ``send`` in the sender to the
return of ``receive`` (checksum-verified tensors in hand) in the receiver, both read from the
machine's monotonic clock; the receiver is already waiting. The plain copies copy one flat
buffer holding all the bytes into a destination written before (no page faults):
``torch.Tensor.copy_`` (the baseline of its headline) and numpy ``copyto`` (glibc memcpy with
streaming stores, faster here). One round of both runs right before each timed update, so they
see the same load on a shared machine. The line ``shm: ... ratio R`` = torch ``copy_`` time /
shm delivery time; the line before gives the ratio against glibc memcpy.
"""

import argparse
import os
import shutil
import socket
import statistics
import struct
import threading
import time

if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common.weight_sync import checksum64, make_receiver, make_sender  # noqa: E402


def smollm2_state(scale_layers: int | None = None) -> dict[str, torch.Tensor]:
    """Random fp32 tensors with SmolLM2-135M's names and shapes (tied lm_head shares the embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=scale_layers or 30,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.tie_weights()
    g = torch.Generator().manual_seed(0)
    made: dict[int, torch.Tensor] = {}
    out = {}
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) not in made:
            made[id(p)] = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02
        out[name] = made[id(p)]
    return out


def unique_bytes(state: dict[str, torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in state.values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def packed_flat(state: dict[str, torch.Tensor]) -> np.ndarray:
    """Every distinct tensor's bytes back to back in one buffer (what the TCP baseline sends)."""
    seen, parts = set(), []
    for t in state.values():
        if id(t) not in seen:
            seen.add(id(t))
            parts.append(t.reshape(-1).view(torch.uint8))
    return torch.cat(parts).numpy()


# ------------------------------------------------------------------- gloo vs plain TCP

TCP, TCP_FRESH = "plain TCP", "plain TCP, fresh buffer"


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("TCP peer closed")
        got += k


def _tcp_serve(sock: socket.socket, nbytes: int) -> None:
    """Child side of the TCP baselines: each message = 8-byte length + 8-byte mode + payload,
    received into one preallocated buffer whose pages are already touched (mode 0), or into a
    fresh ``torch.empty`` per message, as the gloo receiver allocates its buckets (mode 1);
    a 1-byte ack once all is in."""
    buf = np.ones(nbytes, dtype=np.uint8)  # written once: no page faults while receiving
    head = bytearray(16)
    while True:
        _recv_exact(sock, memoryview(head))
        n, mode = struct.unpack("<QQ", head)
        if n == 0:
            return
        dst = buf if mode == 0 else torch.empty(n, dtype=torch.uint8).numpy()
        _recv_exact(sock, memoryview(dst)[:n])
        sock.sendall(b"k")
        del dst


def pair_child(cmd_q, gloo_addrs, tcp_port, nbytes, threads, timeout_s, q):
    """The receiving process: one gloo receiver per sender address (each takes updates in its
    own background thread) and one TCP socket served by a thread; the main thread reports the
    receiver stats of each gloo update the parent announces on ``cmd_q`` (None: finish)."""
    torch.set_num_threads(threads)
    try:
        receivers = [make_receiver("gloo", addr=a, timeout_s=timeout_s, connect_timeout_s=300, threads=threads,
                                   label=f"bench-{i}") for i, a in enumerate(gloo_addrs)]
        tcp = None
        if tcp_port:
            sock = socket.create_connection(("127.0.0.1", tcp_port), timeout=300)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tcp = threading.Thread(target=_tcp_serve, args=(sock, nbytes), daemon=True)
            tcp.start()
        q.put(("ready", None, None))
        while True:
            i = cmd_q.get(timeout=600)
            if i is None:
                break
            version, tensors = receivers[i].receive(timeout_s=600)
            q.put(("got", version, receivers[i].last_stats.as_dict()))
            del tensors
        if tcp is not None:
            tcp.join(timeout=60)
        for r in receivers:
            r.close()
        q.put(("done", None, None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(("error", None, repr(e)))


def bench_gloo_tcp(state, flat, paths, reps, threads, bucket_mbs, port, timeout_s):
    """Interleaved rounds of every path in ``paths`` (``gloo`` once per bucket size, ``tcp``,
    ``tcp-fresh``) between this process (sender) and one spawned child (receiver). Returns
    {path: {"times": [...], "first": s, "stats": [(send SyncStats, receiver stats dict)]}}."""
    nbytes = unique_bytes(state)
    ctx = mp.get_context("spawn")
    q, cmd_q = ctx.Queue(), ctx.Queue()
    senders, gloo_addrs = {}, []
    listener = conn = None
    p = None

    def expect(kind_wanted):
        kind, version, info = q.get(timeout=600)
        if kind == "error":
            raise RuntimeError(f"receiving process: {info}")
        assert kind == kind_wanted, (kind, info)
        return version, info

    try:
        if "gloo" in paths:
            for i, mb in enumerate(bucket_mbs):
                addr = f"127.0.0.1:{port + i}"
                senders[f"gloo {mb:g} MiB buckets"] = (i, make_sender(
                    "gloo", addr=addr, num_receivers=1, timeout_s=timeout_s, connect_timeout_s=300, bucket_mb=mb,
                    threads=threads))
                gloo_addrs.append(addr)
        tcp_port = 0
        if "tcp" in paths or "tcp-fresh" in paths:
            listener = socket.create_server(("127.0.0.1", 0))
            tcp_port = listener.getsockname()[1]
        p = ctx.Process(target=pair_child, args=(cmd_q, gloo_addrs, tcp_port, nbytes, threads, timeout_s, q),
                        daemon=True)
        p.start()
        if listener is not None:
            listener.settimeout(300)
            conn, _ = listener.accept()
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        expect("ready")
        view, ack = memoryview(flat), bytearray(1)

        def gloo_round(name, v):
            i, s = senders[name]
            cmd_q.put(i)  # the child's main thread waits for this update's stats
            t0 = time.perf_counter()
            st = s.send(state, v)
            t = time.perf_counter() - t0
            if st.receivers != 1 or st.failed:
                raise RuntimeError(f"{name} v{v}: not delivered ({st})")
            version, rstats = expect("got")
            assert version == v, (version, v)
            return t, (st, rstats)

        def tcp_round(name, v):
            t0 = time.perf_counter()
            conn.sendall(struct.pack("<QQ", nbytes, int(name == TCP_FRESH)))
            conn.sendall(view)
            _recv_exact(conn, memoryview(ack))
            return time.perf_counter() - t0, None

        names = list(senders) + [n for p_, n in (("tcp", TCP), ("tcp-fresh", TCP_FRESH)) if p_ in paths]
        out = {n: {"times": [], "first": None, "stats": []} for n in names}
        for v in range(reps + 1):
            for name in (names if v % 2 == 0 else names[::-1]):
                time.sleep(0.05)  # let the other side finish its bookkeeping
                t, st = (tcp_round if name in (TCP, TCP_FRESH) else gloo_round)(name, v)
                if v == 0:
                    out[name]["first"] = t
                else:
                    out[name]["times"].append(t)
                    out[name]["stats"].append(st)
        cmd_q.put(None)
        if conn is not None:
            conn.sendall(struct.pack("<QQ", 0, 0))
        expect("done")
        p.join(timeout=60)
        return out
    finally:
        for _, s in senders.values():
            s.close()
        for sck in (conn, listener):
            if sck is not None:
                sck.close()
        if p is not None and p.is_alive():
            p.kill()


def report_gloo_tcp(console, out, nbytes, reps):
    med = {n: statistics.median(d["times"]) for n, d in out.items()}
    tcp = med.get(TCP)
    table = Table(title=f"gloo vs plain TCP between two processes, {nbytes / 1e6:.0f} MB per update "
                        f"(medians of {reps} interleaved rounds)")
    for col in ("path", "seconds", "min s", "GB/s", "first s", "TCP s / path s"):
        table.add_column(col, justify="left" if col == "path" else "right", no_wrap=col == "path")

    def row(label, ts, first=None, end=False):
        m = statistics.median(ts)
        table.add_row(label, f"{m:.3f}", f"{min(ts):.3f}", f"{nbytes / m / 1e9:.2f}",
                      "" if first is None else f"{first:.3f}", f"{tcp / m:.2f}" if tcp else "", end_section=end)

    if TCP in out:
        row("plain TCP: sendall, recv_into a touched buffer, ack", out[TCP]["times"], out[TCP]["first"],
            end=TCP_FRESH not in out)
    if TCP_FRESH in out:
        row("plain TCP into a fresh torch.empty per update", out[TCP_FRESH]["times"], out[TCP_FRESH]["first"], end=True)
    gloo = {n: d for n, d in out.items() if n not in (TCP, TCP_FRESH)}
    parts = {}
    for name, d in gloo.items():
        sends = [s for s, _ in d["stats"]]
        rx = [r for _, r in d["stats"]]
        parts[name] = {"transfer": statistics.median(s.transfer_s for s in sends), "buckets": sends[0].buckets}
        row(f"{name}: send() end to end", d["times"], d["first"])
        row("  send transfer_s (broadcasts + verify + ack)", [s.transfer_s for s in sends])
        row("  receiver transfer_s (broadcasts only)", [r["transfer_s"] for r in rx])
        table.add_row("  send pack_s (copy + checksum)", f"{statistics.median(s.pack_s for s in sends):.3f}")
        table.add_row("  receiver pack_s (verify checksum)", f"{statistics.median(r['pack_s'] for r in rx):.3f}",
                      end_section=True)
    console.print(table)
    console.print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if TCP_FRESH in out and tcp:
        f = med[TCP_FRESH]
        print(f"plain TCP into a fresh buffer per update: {f:.3f} s ({nbytes / f / 1e9:.2f} GB/s), "
              f"TCP s / fresh s {tcp / f:.2f} (the cost of first-touch page faults on the receiving side)")
    if tcp:
        for name, d in gloo.items():
            g, tr = med[name], parts[name]["transfer"]
            per_round = [t / x for t, x in zip(out[TCP]["times"], d["times"])]
            print(f"{name} ({parts[name]['buckets']} buckets): plain TCP {tcp:.3f} s ({nbytes / tcp / 1e9:.2f} GB/s); "
                  f"gloo send() {g:.3f} s ({nbytes / g / 1e9:.2f} GB/s), transfer_s {tr:.3f} s "
                  f"({nbytes / tr / 1e9:.2f} GB/s)")
            print(f"  per-round end-to-end ratios: {', '.join(f'{r:.2f}' for r in per_round)}")
            print(f"  ratio end-to-end (TCP s / gloo send() s): {tcp / g:.2f}")
            print(f"  ratio transfer-only (TCP s / gloo transfer_s): {tcp / tr:.2f}")


# ------------------------------------------------------------------------------- shm


def shm_receiver_main(kw, n_updates, threads, q):
    torch.set_num_threads(threads)
    try:
        r = make_receiver("shm", rank=1, num_receivers=1, **kw)
        q.put(("ready", None, None))
        for _ in range(n_updates):
            version, tensors = r.receive(timeout_s=600)
            t_done = time.perf_counter()
            q.put(("got", version, (t_done, r.last_stats.as_dict(), len(tensors))))
            del tensors
        r.close()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(("error", None, repr(e)))


class Memcpy:
    """Plain copies of one flat buffer holding all the bytes, into a destination whose pages are
    already touched: torch ``copy_`` and numpy ``copyto`` (glibc memcpy)."""

    def __init__(self, nbytes):
        self.src = torch.empty(nbytes, dtype=torch.uint8).random_()
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)
        s_np, d_np = self.src.numpy(), self.dst.numpy()
        self.variants = {"torch copy_": lambda: self.dst.copy_(self.src), "glibc memcpy": lambda: np.copyto(d_np, s_np)}
        self.times = {k: [] for k in self.variants}
        self.rounds = 0

    def run_once(self):
        names = list(self.variants)
        self.rounds += 1
        for name in names if self.rounds % 2 else names[::-1]:  # alternate the order
            fn = self.variants[name]
            t0 = time.perf_counter()
            fn()
            self.times[name].append(time.perf_counter() - t0)

    def checksum_s(self):
        t0 = time.perf_counter()
        checksum64(self.dst)
        return time.perf_counter() - t0


def bench_shm(state, reps, threads, bucket_mb, port, timeout_s, memcpy):
    """Deliver ``reps`` + 1 updates to one receiving process over shm; a memcpy round runs right
    before each timed update, so both see the same load on a shared machine."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    kw = dict(timeout_s=timeout_s, connect_timeout_s=300, channel=f"bench-{port}", threads=threads)
    p = ctx.Process(target=shm_receiver_main, args=(kw, reps + 1, threads, q), daemon=True)
    p.start()

    def expect(kind_wanted):
        kind, version, info = q.get(timeout=300)
        if kind == "error":
            raise RuntimeError(f"shm receiver: {info}")
        assert kind == kind_wanted, kind
        return version, info

    try:
        expect("ready")  # the receiver is waiting before the first update
        s = make_sender("shm", num_receivers=1, bucket_mb=bucket_mb, **kw)
        times, first, stats = [], None, []
        for v in range(reps + 1):
            if v:
                time.sleep(0.05)  # let the receiver finish its bookkeeping
                memcpy.run_once()
            t0 = time.perf_counter()
            st = s.send(state, v)
            version, (t_done, rstats, _) = expect("got")
            assert version == v, (version, v)
            if v == 0:
                first = t_done - t0
            else:
                times.append(t_done - t0)
                stats.append((st, rstats))
        s.close()
        p.join(timeout=60)
        return times, first, stats
    finally:
        if p.is_alive():
            p.kill()
        shutil.rmtree(f"/dev/shm/prime-ws-{kw['channel']}", ignore_errors=True)


def report_shm(console, times, first, stats, mem, nbytes, reps, memcpy):
    table = Table(title=f"shm delivery, {nbytes / 1e6:.0f} MB to one receiving process (medians of {reps})")
    for col in ("path", "seconds", "min s", "GB/s", "first s", "send pack s", "recv verify s",
                "copy_ / path", "memcpy / path"):
        table.add_column(col, justify="left" if col == "path" else "right", no_wrap=col == "path")
    t_torch, t_glibc = statistics.median(mem["torch copy_"]), statistics.median(mem["glibc memcpy"])
    for name, ts in mem.items():
        med = statistics.median(ts)
        table.add_row(f"  flat buffer, {name}", f"{med:.3f}", f"{min(ts):.3f}", f"{nbytes / med / 1e9:.2f}",
                      "", "", "", f"{t_torch / med:.2f}", f"{t_glibc / med:.2f}")
    shm = statistics.median(times)
    table.add_row("shm", f"{shm:.3f}", f"{min(times):.3f}", f"{nbytes / shm / 1e9:.2f}", f"{first:.3f}",
                  f"{statistics.median(s.pack_s for s, _ in stats):.3f}",
                  f"{statistics.median(r['pack_s'] for _, r in stats):.3f}", f"{t_torch / shm:.2f}",
                  f"{t_glibc / shm:.2f}")
    console.print(table)
    console.print("(the plain copies are timed right before each shm update; send pack = copy into the buckets + "
                  "checksum; recv verify = checksum check, overlapping the sender's writes)")
    console.print(f"checksum alone (int64 wrapping sum of {nbytes / 1e6:.0f} MB, numpy, one thread): "
                  f"{memcpy.checksum_s():.3f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"shm vs glibc memcpy (numpy copyto: streaming stores) {t_glibc:.3f} s: ratio {t_glibc / shm:.2f}")
    print(f"shm: {nbytes / 1e6:.0f} MB delivered in {shm:.3f} s; memcpy (torch copy_ of the flattened buffer) "
          f"{t_torch:.3f} s; ratio {t_torch / shm:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per path (median reported)")
    ap.add_argument("--backends", default="gloo,tcp,tcp-fresh,shm",
                    help="comma-separated: gloo, tcp (plain-socket baseline, interleaved with gloo), tcp-fresh "
                         "(the same into a fresh buffer per update), shm")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per process: torch's, and weight sync's copy/checksum threads")
    ap.add_argument("--bucket-mb", default="512",
                    help="max bucket size [MiB]; for gloo a comma-separated list runs one sender per size")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers for a smaller model (default: 30)")
    ap.add_argument("--port", type=int, default=29571, help="first port of the gloo senders' stores")
    ap.add_argument("--timeout", type=float, default=120.0, help="weight-sync deadline per update [s]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"gloo", "tcp", "tcp-fresh", "shm"}
    if unknown:
        ap.error(f"unknown backend(s) {sorted(unknown)}; choose from gloo, tcp, tcp-fresh, shm")
    bucket_mbs = [float(x) for x in args.bucket_mb.split(",") if x.strip()]

    state = smollm2_state(args.layers)
    nbytes = unique_bytes(state)
    console = Console(width=120)
    console.print(f"model: SmolLM2-135M shape{'' if not args.layers else f' with {args.layers} layers'}, "
                  f"{len(state)} tensors, {nbytes / 4e6:.1f}M fp32 parameters, {nbytes / 1e6:.0f} MB; "
                  f"{args.threads} thread(s) per process; {args.reps} timed rounds per path")

    paths = [b for b in backends if b in ("gloo", "tcp", "tcp-fresh")]
    if paths:
        flat = packed_flat(state) if "tcp" in paths or "tcp-fresh" in paths else np.empty(0, dtype=np.uint8)
        out = bench_gloo_tcp(state, flat, paths, args.reps, args.threads, bucket_mbs, args.port, args.timeout)
        del flat
        report_gloo_tcp(console, out, nbytes, args.reps)
    if "shm" in backends:
        memcpy = Memcpy(nbytes)
        times, first, stats = bench_shm(state, args.reps, args.threads, bucket_mbs[-1], args.port + 50,
                                        args.timeout, memcpy)
        report_shm(console, times, first, stats, memcpy.times, nbytes, args.reps, memcpy)


if __name__ == "__main__":
    main()
