"""Check a config for a multi-host run without training (``launch/check.py``,
``launch/run.py --check``).

Contract
--------
``check_cluster(cfg, role=...)`` returns a list of ``Finding(level, field, message)``
(level ``ok``/``warn``/``error``); every message names the dotted config field it is about,
e.g. ``async.weight_sync_addr: cannot reach 10.0.0.5:29555 (connection refused)``.
``report(findings)`` prints them and returns the exit code (1 if any error, else 0).

Roles (what this host will run):
- ``static`` (default): everything checkable without the network, for both sides' fields:
  addresses parse (``transport.*_addr`` are ``tcp://HOST:PORT``, ``async.weight_sync_addr``
  is ``host:port``), CURVE key files present, readable and consistent when
  ``common.transport.curve_enabled`` says CURVE is on (an endpoint off loopback, or
  ``transport.curve_force``), model and data paths exist, GPU lists parse and fit this
  host's CUDA devices, the weight-sync backend suits the device (nccl needs CUDA).
- ``learner``: the learner's fields, and that every port it will bind is free here
  (the transport endpoints bound with ZeroMQ itself; the weight-sync store's port on all
  interfaces, and its host must be an address of this machine: rank 0 hosts the store).
- ``actor``: the actors' fields, and that this host reaches the running learner: a TCP
  connect to both transport endpoints and a ZeroMQ handshake with the actor's CURVE key
  (so a key the learner does not allow is reported here), and a TCP connect to the
  weight-sync store (nccl/gloo). ``reach_host`` replaces the host of all three (a config
  whose endpoints are the learner's bind addresses, e.g. 0.0.0.0).
- ``local``: one machine runs both (``launch/run.py``): both sides' fields and the binds.
Relative paths are resolved against ``base`` (default: the working directory), as the
processes will resolve them.

Not covered: the torchrun rendezvous, NCCL between hosts (only that CUDA is there), model
contents beyond ``config.json``, firewall rules between actor hosts. A TCP connect to the
weight-sync store opens and closes one connection the store ignores; a successful ZeroMQ
handshake is invisible to the learner (no message is sent).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from common.transport import curve_enabled, is_loopback

__all__ = ["Finding", "ROLES", "check_cluster", "report", "parse_zmq_tcp", "parse_host_port"]

ROLES = ("static", "learner", "actor", "local")


@dataclass(frozen=True)
class Finding:
    level: str  # "ok" | "warn" | "error"
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


# ---------------------------------------------------------------------------- parsing


def parse_zmq_tcp(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` (also ``tcp://[v6]:PORT`` and ZeroMQ's ``tcp://SRC;HOST:PORT``)
    -> (host, port); ValueError saying what is wrong otherwise."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise ValueError(f"{endpoint!r} is not a ZeroMQ endpoint (want tcp://HOST:PORT)")
    if scheme != "tcp":
        raise ValueError(f"{endpoint!r}: {scheme}:// reaches only this machine; "
                         "a multi-host run needs tcp://HOST:PORT")
    host, port = _host_port(rest.rsplit(";", 1)[-1], endpoint)
    return host, port


def parse_host_port(addr: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); ValueError otherwise."""
    return _host_port(addr, addr)


def _host_port(s: str, whole: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ValueError(f"{whole!r} has no host:port")
    if port in ("*", "0", "!") or port.startswith("!"):
        raise ValueError(f"{whole!r}: a port picked by the OS cannot be known by the other "
                         "hosts; give a number")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{whole!r}: port {port!r} is not a number in 1..65535")
    return host, int(port)


def _gpu_list(s: str) -> list[int]:
    ids = [x.strip() for x in s.split(",")]
    if not ids or not all(x.isdigit() for x in ids):
        raise ValueError(f"{s!r} is not a comma-separated list of GPU ids")
    return [int(x) for x in ids]


def _why(e: BaseException) -> str:
    """A short lower-case reason: 'connection refused', 'timed out', 'address already in use'."""
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host: {e.strerror}"
    if isinstance(e, TimeoutError) and not getattr(e, "strerror", None):
        return "timed out"
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return msg[:1].lower() + msg[1:]


def _zmq_why(e: zmq.ZMQError) -> str:
    known = {errno.EADDRINUSE: "address already in use: is a learner already running?",
             errno.EADDRNOTAVAIL: "not an address of this machine",
             errno.ENODEV: "no such interface, address or host name here"}
    if e.errno in known:
        return known[e.errno]
    msg = str(e.strerror).split(" (addr=")[0]
    return msg[:1].lower() + msg[1:]


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------- checks


class _Checker:
    def __init__(self, cfg, role: str, reach_host: str | None, nproc_per_node: int | None,
                 base: Path, timeout_s: float, cuda_devices: int | None):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.cfg, self.role, self.reach_host = cfg, role, reach_host
        self.nproc, self.base, self.timeout_s = nproc_per_node, base, timeout_s
        self.learner_side = role in ("static", "learner", "local")
        self.actor_side = role in ("static", "actor", "local")
        self._cuda = cuda_devices
        self._cuda_known = cuda_devices is not None
        self.client_keys = None
        self.out: list[Finding] = []
        self.endpoints: dict[str, tuple[str, int]] = {}   # field -> (host, port), the ones that parsed

    # findings
    def ok(self, f, m):
        self.out.append(Finding("ok", f, m))

    def warn(self, f, m):
        self.out.append(Finding("warn", f, m))

    def err(self, f, m):
        self.out.append(Finding("error", f, m))

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base / q

    def cuda_count(self) -> int | None:
        """CUDA devices on this host; None when torch is not importable."""
        if not self._cuda_known:
            self._cuda_known = True
            try:
                import torch
            except ImportError:
                self._cuda = None
            else:
                self._cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return self._cuda

    # ---------------------------------------------------------------- addresses
    def addresses(self):
        t, a = self.cfg.transport, self.cfg.async_
        for name in ("trajectory_addr", "control_addr"):
            field, ep = f"transport.{name}", getattr(t, name)
            try:
                self.endpoints[field] = parse_zmq_tcp(ep)
                self.ok(field, ep)
            except ValueError as e:
                self.err(field, str(e))
        if len(self.endpoints) == 2 and len({p for _, p in self.endpoints.values()}) == 1:
            (h1, p1), (h2, _) = self.endpoints.values()
            if h1 == h2 or "*" in (h1, h2) or "0.0.0.0" in (h1, h2):
                self.err("transport.control_addr", f"uses port {p1} like transport.trajectory_addr; give each its own")
        if a.weight_sync in ("nccl", "gloo"):
            try:
                host, port = parse_host_port(a.weight_sync_addr)
            except ValueError as e:
                self.err("async.weight_sync_addr", str(e))
            else:
                self.endpoints["async.weight_sync_addr"] = (host, port)
                if port in {p for _, p in list(self.endpoints.values())[:-1]}:
                    self.err("async.weight_sync_addr", f"port {port} is also a transport port; give it its own")
                else:
                    self.ok("async.weight_sync_addr", a.weight_sync_addr)
        multi_host = not (is_loopback(t.trajectory_addr) and is_loopback(t.control_addr))
        if multi_host and t.run_id is None:
            self.warn("transport.run_id", "unset: actors of another run pointed at this learner would be accepted; "
                                          "give every host of this run the same transport.run_id")
        if multi_host and a.weight_sync == "shm":
            self.warn("async.weight_sync", "shm reaches only actors on the learner's machine; actors on "
                                           "other hosts need nccl (GPU) or gloo")
        if multi_host and a.weight_sync in ("nccl", "gloo") and "async.weight_sync_addr" in self.endpoints:
            host = self.endpoints["async.weight_sync_addr"][0]
            if host == "localhost" or _is_loopback_ip(host):
                self.warn("async.weight_sync_addr", f"{a.weight_sync_addr} is reachable only from the learner's "
                          "machine; with actors on other hosts point it at the learner's rank-0 host")

    # ---------------------------------------------------------------- CURVE
    def _load(self, field: str, value: str | None, need_secret: bool):
        if not value:
            self.err(field, "is not set (CURVE is on: an endpoint is off loopback or transport.curve_force)")
            return None
        p = self.path(value)
        if not p.is_file():
            self.err(field, f"no such file {p} (write the keys with launch/keys.py)")
            return None
        try:
            public, secret = zmq.auth.load_certificate(p)
        except (ValueError, OSError) as e:
            self.err(field, f"cannot read a CURVE key from {p}: {e}")
            return None
        if need_secret and not secret:
            self.err(field, f"{p} holds no secret key (give the .key_secret file)")
            return None
        if need_secret and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.warn(field, f"{p} is readable by other users (chmod 600 it)")
        else:
            self.ok(field, f"{p} ({'secret key' if need_secret else 'public key'})")
        return public, secret

    def curve(self):
        t = self.cfg.transport
        if not curve_enabled(t):
            self.ok("transport.curve_secret_key", "CURVE off: every transport endpoint is loopback")
            return
        server = client = allowed = None
        if self.learner_side:
            server = self._load("transport.curve_secret_key", t.curve_secret_key, True)
            if not t.curve_public_keys_dir:
                self.err("transport.curve_public_keys_dir", "is not set (the folder of the clients' public keys; "
                         "launch/keys.py writes it as <out>/clients)")
            else:
                d = self.path(t.curve_public_keys_dir)
                if not d.is_dir():
                    self.err("transport.curve_public_keys_dir", f"no such folder {d}")
                else:
                    try:
                        allowed = set(zmq.auth.load_certificates(d))
                    except (ValueError, OSError) as e:
                        self.err("transport.curve_public_keys_dir", f"cannot read the public keys in {d}: {e}")
                    else:
                        if allowed:
                            self.ok("transport.curve_public_keys_dir", f"{d} ({len(allowed)} client key(s))")
                        else:
                            self.err("transport.curve_public_keys_dir", f"{d} holds no *.key public key: no actor could connect")
        if self.actor_side:
            client = self._load("transport.curve_client_secret_key", t.curve_client_secret_key, True)
            srv_pub = None
            if t.curve_server_public_key:
                srv = self._load("transport.curve_server_public_key", t.curve_server_public_key, False)
                srv_pub = srv[0] if srv else None
                if srv_pub and server and srv_pub != server[0]:
                    self.err("transport.curve_server_public_key",
                             "is not the public key of transport.curve_secret_key: actors would fail the handshake")
            elif server:
                srv_pub = server[0]  # actors read the learner's public key from its secret-key file
            elif t.curve_secret_key and not self.learner_side:
                srv = self._load("transport.curve_secret_key", t.curve_secret_key, False)
                srv_pub = srv[0] if srv else None
            elif not t.curve_secret_key:
                self.err("transport.curve_server_public_key",
                         "is not set (the learner's public-key file, <out>/learner.key from launch/keys.py)")
            self.client_keys = (client[0], client[1], srv_pub) if client and srv_pub else None
        if client and allowed is not None and client[0] not in allowed:
            self.err("transport.curve_client_secret_key",
                     "its public key is not in transport.curve_public_keys_dir: the learner would refuse this actor")

    # ---------------------------------------------------------------- model and data paths
    def paths(self):
        m, cfg = self.cfg.model, self.cfg
        if cfg.task.kind == "arithmetic":
            self.ok("model.policy_path", "written by the warm-up (task.kind=arithmetic)")
        else:
            self._dir("model.policy_path", m.policy_path, model=True)
            if m.prm_path:
                self._dir("model.prm_path", m.prm_path, model=True)
            if m.ref_path and m.ref == "sft":
                self._dir("model.ref_path", m.ref_path, model=True)
            if m.tokenizer_path:
                self._dir("model.tokenizer_path", m.tokenizer_path, model=False)
        if not self.actor_side or cfg.task.kind == "arithmetic":
            return
        if cfg.actors.prompts_path is None:
            self.err("actors.prompts_path", "is not set (task.kind=none: give the training prompts)")
        else:
            self._file("actors.prompts_path", cfg.actors.prompts_path)
        if cfg.eval.every > 0:
            if cfg.eval.heldout_path is None:
                self.warn("eval.heldout_path", "is not set: no held-out evaluation (or set eval.every=0)")
            elif not self.path(cfg.eval.heldout_path).exists():  # the evaluator fails, training goes on
                self.warn("eval.heldout_path", f"no such file {self.path(cfg.eval.heldout_path)}: the held-out "
                          "evaluator would fail (eval.every=0 turns it off)")
            else:
                self.ok("eval.heldout_path", str(self.path(cfg.eval.heldout_path)))

    def _dir(self, field, value, model):
        p = self.path(value)
        if not p.exists():
            self.err(field, f"no such directory {p}")
        elif model and not (p / "config.json").is_file():
            self.err(field, f"{p} has no config.json: not a transformers model directory")
        else:
            self.ok(field, str(p))

    def _file(self, field, value):
        p = self.path(value)
        if p.exists():
            self.ok(field, str(p))
        else:
            self.err(field, f"no such file {p}")

    # ---------------------------------------------------------------- GPUs and devices
    def devices(self):
        cfg, a = self.cfg, self.cfg.actors
        lists = {}
        for name in ("gpus", "learner_gpus"):
            v = getattr(a, name)
            if v is None:
                continue
            try:
                ids = _gpu_list(v)
            except ValueError as e:
                self.err(f"actors.{name}", str(e))
                continue
            if len(set(ids)) != len(ids):
                self.err(f"actors.{name}", f"{v!r} names a GPU twice")
                continue
            lists[name] = ids
        if a.total_slots is not None and a.first_slot + a.num > a.total_slots:
            self.err("actors.total_slots", f"actors.first_slot + actors.num = {a.first_slot + a.num} exceeds "
                     f"actors.total_slots = {a.total_slots}")
        if "gpus" in lists and a.num > len(lists["gpus"]):
            self.warn("actors.gpus", f"{a.num} actors share {len(lists['gpus'])} GPU(s) (actor i on the i-th mod "
                      f"{len(lists['gpus'])})")
        if "gpus" in lists and "learner_gpus" in lists and set(lists["gpus"]) & set(lists["learner_gpus"]) \
                and self.role in ("static", "local"):
            both = sorted(set(lists["gpus"]) & set(lists["learner_gpus"]))
            self.warn("actors.learner_gpus", f"GPU(s) {both} are shared with actors.gpus (fine for a small model; "
                      "vLLM and the learner compete for memory)")
        if self.nproc and "learner_gpus" in lists and self.nproc > len(lists["learner_gpus"]) \
                and self.role in ("static", "local", "learner"):
            self.err("actors.learner_gpus", f"{len(lists['learner_gpus'])} GPU(s) for {self.nproc} learner ranks "
                     "(--nproc-per-node)")
        n = self.cuda_count()
        need_cuda = []
        if self.learner_side and cfg.run.device == "cuda":
            need_cuda.append(("run.device", "cuda"))
        if cfg.async_.weight_sync == "nccl":
            need_cuda.append(("async.weight_sync", "nccl"))
        for field, what in need_cuda:
            if n is None:
                self.err(field, f"{what} needs CUDA, and torch cannot be imported here")
            elif n == 0:
                self.err(field, f"{what} needs CUDA, and this host has no CUDA device"
                         + ("; use gloo across hosts (or shm on one host)" if field == "async.weight_sync" else ""))
            else:
                self.ok(field, f"{what} ({n} CUDA device(s) here)")
        if cfg.async_.weight_sync != "nccl":
            self.ok("async.weight_sync", cfg.async_.weight_sync)
        for name, ids in lists.items():
            if not (self.actor_side if name == "gpus" else self.learner_side):
                continue
            if not n:
                self.warn(f"actors.{name}", "not checked: no CUDA device visible on this host")
            elif bad := [i for i in ids if i >= n]:
                self.err(f"actors.{name}", f"GPU(s) {bad} do not exist here (this host has {n}: 0..{n - 1})")
            else:
                self.ok(f"actors.{name}", ",".join(map(str, ids)))

    # ---------------------------------------------------------------- learner: binds
    def binds(self):
        for field in ("transport.trajectory_addr", "transport.control_addr"):
            if field not in self.endpoints:
                continue
            ep = getattr(self.cfg.transport, field.split(".")[1])
            ctx = zmq.Context()
            s = ctx.socket(zmq.ROUTER)
            s.linger = 0
            try:
                s.bind(ep)
                self.ok(field, f"{ep} can be bound here")
            except zmq.ZMQError as e:
                self.err(field, f"cannot bind {ep} ({_zmq_why(e)})")
            finally:
                s.close(0)
                ctx.term()
        field = "async.weight_sync_addr"
        if field not in self.endpoints:
            return
        host, port = self.endpoints[field]
        try:  # rank 0 hosts the store: its host must be this machine
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            self.err(field, f"cannot resolve {host} ({e.strerror})")
            return
        local = False
        for fam, _, _, _, sa in infos:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                try:
                    s.bind((sa[0], 0))
                    local = True
                    break
                except OSError:
                    continue
        if not local:
            self.err(field, f"{host} is not an address of this machine: the learner's rank 0 hosts the "
                            "weight-sync store, so run it here or point this at its host")
            return
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the store listens on all interfaces
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
                self.ok(field, f"port {port} is free here")
            except OSError as e:
                self.err(field, f"cannot bind port {port} ({_why(e)})")

    # ---------------------------------------------------------------- actor: reachability
    def reach(self):
        for field in ("transport.trajectory_addr", "transport.control_addr", "async.weight_sync_addr"):
            if field not in self.endpoints:
                continue
            host, port = self.endpoints[field]
            if self.reach_host:
                host = self.reach_host
            elif host == "*":
                self.err(field, "is a bind address ('*'); on an actor host give the learner's host (or --reach HOST)")
                continue
            elif host in ("0.0.0.0", "::"):
                self.warn(field, f"{host} reaches only this machine; on another host give the learner's host "
                                 "(or --reach HOST)")
            where = _fmt(host, port)
            try:
                with socket.create_connection((host, port), timeout=self.timeout_s):
                    pass
            except OSError as e:
                self.err(field, f"cannot reach {where} ({_why(e)})")
                continue
            if field.startswith("async."):
                self.ok(field, f"reached {where} (the weight-sync store)")
                continue
            curve = curve_enabled(self.cfg.transport)
            keys = self.client_keys
            if curve and keys is None:
                self.ok(field, f"reached {where} (TCP; no ZeroMQ handshake tried: no usable CURVE keys)")
                continue
            problem = _zmtp_handshake(f"tcp://{where}", keys if curve else None, self.timeout_s)
            if problem is None:
                self.ok(field, f"reached {where}, ZeroMQ handshake {'with CURVE ' if curve else ''}accepted")
            elif problem.startswith("auth:"):
                self.err("transport.curve_client_secret_key",
                         f"the learner at {where} refused this key ({problem[5:].strip()}): its public key is not in "
                         "the learner's transport.curve_public_keys_dir")
            else:
                self.err(field, f"reached {where} but {problem}")

    def run(self) -> list[Finding]:
        self.addresses()
        self.curve()
        self.paths()
        self.devices()
        if self.role in ("learner", "local"):
            self.binds()
        if self.role == "actor":
            self.reach()
        return self.out


def _is_loopback_ip(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HS_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)


def _zmtp_handshake(endpoint: str, keys: tuple[bytes, bytes, bytes] | None, timeout_s: float) -> str | None:
    """Connect a DEALER (with CURVE ``keys`` = (public, secret, server public), or none) and
    wait for the ZeroMQ handshake; None if it succeeded, else why (``auth: ...`` when the
    server refused the key). Sends no message."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if keys:
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = keys
    mon = s.get_monitor_socket(_HS_EVENTS)
    disconnected = False
    try:
        s.connect(endpoint)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not mon.poll(int(left * 1000) + 1):
                break
            ev = recv_monitor_message(mon)
            e = ev["event"]
            if e == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return None
            if e == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return f"auth: status {ev['value']}"
            if e == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                return "the ZeroMQ handshake failed (protocol error: a CURVE setting differs from the learner's, " \
                       "or transport.curve_server_public_key is not the learner's key)"
            if e == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                return "the ZeroMQ handshake failed"
            if e == zmq.EVENT_DISCONNECTED:
                disconnected = True
        return (f"no ZeroMQ handshake within {timeout_s:g} s ("
                + ("the peer hung up: transport.curve_server_public_key may not be the learner's key, or CURVE is "
                   "off on one side" if disconnected else "is the learner's transport listening there?") + ")")
    finally:
        s.disable_monitor()
        mon.close(0)
        s.close(0)
        ctx.term()


def check_cluster(cfg, role: str = "static", *, reach_host: str | None = None, nproc_per_node: int | None = None,
                  base: str | Path | None = None, timeout_s: float = 3.0,
                  cuda_devices: int | None = None) -> list[Finding]:
    """All findings for ``cfg`` on this host in ``role`` (see the module docstring).
    ``reach_host`` implies role ``actor``; ``cuda_devices`` overrides the detected count
    (tests); ``base`` resolves relative paths (default: the working directory)."""
    if reach_host:
        role = "actor"
    base = Path(base) if base is not None else Path(os.getcwd())
    return _Checker(cfg, role, reach_host, nproc_per_node, base, timeout_s, cuda_devices).run()


def report(findings: list[Finding], print_fn=print, title: str = "") -> int:
    """Print errors, warnings, then the OK list; return 1 if any error, else 0."""
    errors = [f for f in findings if f.level == "error"]
    warns = [f for f in findings if f.level == "warn"]
    oks = [f for f in findings if f.level == "ok"]
    for f in errors:
        print_fn(f"error: {f}")
    for f in warns:
        print_fn(f"warning: {f}")
    for f in oks:
        print_fn(f"ok: {f}")
    head = f"{title}: " if title else ""
    if errors:
        print_fn(f"{head}{len(errors)} error(s), {len(warns)} warning(s): not ready")
        return 1
    print_fn(f"{head}ready ({len(oks)} checks ok, {len(warns)} warning(s))")
    return 0

