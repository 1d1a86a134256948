"""Seconds to deliver a model's weights from a sender to ONE receiving process, per weight-sync
backend that runs on a CPU machine (gloo, shm), next to a plain in-process memory copy of the
same bytes, in one run.

    .venv/bin/python benchmarks/weight_sync.py [--reps 9] [--backends gloo,shm] [--threads 1]

The model defaults to the SmolLM2-135M shape (LlamaConfig hidden 576, 30 layers, vocab 49152,
tied embeddings: 134.5M fp32 parameters, 538 MB, random values). Delivery time = from the
start of ``send`` in the sender to the return of ``receive`` (checksum-verified tensors in hand)
in the receiver, both read from the machine's monotonic clock; the receiver is already waiting.
The plain copies copy one flat buffer holding all the bytes into a destination written before
(no page faults): ``torch.Tensor.copy_`` (the baseline of the headline) and numpy ``copyto``
(glibc memcpy with streaming stores, faster here). One round of both runs right before each
timed update, so they see the same load on a shared machine. Each row is the median over --reps
updates after one warm-up update (the first pays for creating files/buffers and compiling the
copy kernel; shown apart). The last line ends with the headline: ``ratio R`` = torch ``copy_``
time / shm delivery time; the line before gives the ratio against glibc memcpy.
"""

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def receiver_main(backend, kw, n_updates, threads, q):
    torch.set_num_threads(threads)
    try:
        r = make_receiver(backend, rank=1, num_receivers=1, **kw)
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


def bench_backend(backend, state, reps, threads, bucket_mb, port, timeout_s, memcpy):
    """Deliver ``reps`` + 1 updates to one receiving process; a memcpy round runs right before
    each timed update, so both see the same load on a shared machine."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    kw = dict(timeout_s=timeout_s, connect_timeout_s=300, addr=f"127.0.0.1:{port}", channel=f"bench-{port}", threads=threads)
    p = ctx.Process(target=receiver_main, args=(backend, kw, reps + 1, threads, q), daemon=True)
    p.start()

    def expect(kind_wanted):
        kind, version, info = q.get(timeout=300)
        if kind == "error":
            raise RuntimeError(f"{backend} receiver: {info}")
        assert kind == kind_wanted, kind
        return version, info

    try:
        if backend == "shm":  # the receiver is waiting before the first update
            expect("ready")
        s = make_sender(backend, num_receivers=1, bucket_mb=bucket_mb, **kw)
        if backend != "shm":
            expect("ready")
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
        if backend == "shm":
            shutil.rmtree(f"/dev/shm/prime-ws-{kw['channel']}", ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=9, help="timed updates per backend (median reported)")
    ap.add_argument("--backends", default="gloo,shm", help="comma-separated: gloo, shm, nccl")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per process: torch's, and weight sync's copy/checksum threads")
    ap.add_argument("--bucket-mb", type=float, default=512, help="max bucket size [MiB]")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers for a smaller model (default: 30)")
    ap.add_argument("--port", type=int, default=29571)
    ap.add_argument("--timeout", type=float, default=120.0, help="weight-sync deadline per update [s]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    state = smollm2_state(args.layers)
    nbytes = unique_bytes(state)
    console = Console(width=120)
    console.print(f"model: SmolLM2-135M shape{'' if not args.layers else f' with {args.layers} layers'}, "
                  f"{len(state)} tensors, {nbytes / 4e6:.1f}M fp32 parameters, {nbytes / 1e6:.0f} MB; "
                  f"{args.threads} thread(s) per process; {args.reps} timed updates per backend")

    memcpy = Memcpy(nbytes)
    rows = {}
    for i, backend in enumerate(b.strip() for b in args.backends.split(",") if b.strip()):
        memcpy.times = {k: [] for k in memcpy.variants}  # each backend against the copies timed beside it
        rows[backend] = bench_backend(backend, state, args.reps, args.threads, args.bucket_mb,
                                      args.port + 10 * i, args.timeout, memcpy) + (memcpy.times,)
    table = Table(title=f"weight delivery, {nbytes / 1e6:.0f} MB to one receiving process (medians of {args.reps})")
    for col in ("path", "seconds", "min s", "GB/s", "first s", "send pack s", "recv verify s",
                "copy_ / path", "memcpy / path"):
        table.add_column(col, justify="left" if col == "path" else "right")
    ratios = {}
    for backend, (times, first, stats, mem) in rows.items():
        t_torch, t_glibc = statistics.median(mem["torch copy_"]), statistics.median(mem["glibc memcpy"])
        for name, ts in mem.items():
            med = statistics.median(ts)
            table.add_row(f"  flat buffer, {name}", f"{med:.3f}", f"{min(ts):.3f}", f"{nbytes / med / 1e9:.2f}",
                          "", "", "", f"{t_torch / med:.2f}", f"{t_glibc / med:.2f}")
        med = statistics.median(times)
        ratios[backend] = (med, t_torch, t_glibc)
        table.add_row(f"{backend}", f"{med:.3f}", f"{min(times):.3f}", f"{nbytes / med / 1e9:.2f}", f"{first:.3f}",
                      f"{statistics.median(s.pack_s for s, _ in stats):.3f}",
                      f"{statistics.median(r['pack_s'] for _, r in stats):.3f}", f"{t_torch / med:.2f}", f"{t_glibc / med:.2f}",
                      end_section=True)
    console.print(table)
    console.print("(each backend's row follows the plain copies timed right before each of its updates; "
                  "send pack = copy into the buckets + checksum; recv verify = checksum check, overlapping the "
                  "sender's writes for shm)")
    console.print(f"checksum alone (int64 wrapping sum of {nbytes / 1e6:.0f} MB, numpy, one thread): {memcpy.checksum_s():.3f} s; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if "shm" in ratios:
        shm, t_torch, t_glibc = ratios["shm"]
        print(f"shm vs glibc memcpy (numpy copyto: streaming stores) {t_glibc:.3f} s: ratio {t_glibc / shm:.2f}")
        print(f"shm: {nbytes / 1e6:.0f} MB delivered in {shm:.3f} s; memcpy (torch copy_ of the flattened buffer) "
              f"{t_torch:.3f} s; ratio {t_torch / shm:.2f}")


if __name__ == "__main__":
    main()
