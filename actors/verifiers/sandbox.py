"""Run an untrusted Python program under bubblewrap with resource limits.

Contract
--------
- Callers: ``code_verifier`` (and a launcher that calls ``sandbox_available()`` at start).
- ``run_python(files, main, timeout_s=..., limits=...)`` writes ``files`` into a fresh
  temporary directory, binds it read-only at ``/sandbox`` and runs ``/sandbox/<main>`` with
  the real interpreter behind ``sys.executable`` (``-I -S -B``: standard library only, no
  site-packages, no environment). It returns a ``RunResult`` and never raises for anything
  the program does; it raises ``SandboxUnavailable`` when bubblewrap cannot run here and
  unsandboxed mode was not allowed.
- Invariants of a sandboxed run: no network (own network namespace: a private loopback
  only), its own PID/IPC/UTS/mount namespaces, an empty environment (PATH, LANG,
  HOME=/tmp), a read-only root assembled from /usr, the /bin-/lib links, two /etc files and
  the Python installation, a size-capped tmpfs at /tmp as the only writable place, an
  unprivileged uid, and rlimits (CPU, address space, processes, file size, open files,
  stack, no core files). The wall time is bounded by ``timeout_s`` plus the teardown
  (a few ms; up to ~0.5 s when a fork bomb filled the process cap on a loaded host), output
  by ``limits.max_output_bytes`` (stdout+stderr; the run is killed on overflow). When it
  returns, no process of the run is left: the sandbox's PID 1 is SIGKILLed through a pidfd
  and awaited (its death takes every process of the PID namespace with it, detached ones
  too), and bubblewrap's process group is SIGKILLed and reaped. A caller that is SIGKILLed
  itself takes its sandbox along (``--die-with-parent``); the run directory it leaves is
  swept an hour later by the next process's probe.
- Processes: RLIMIT_NPROC is not enforced for uid 0, so as root the program runs under a
  dedicated unprivileged uid (``SANDBOX_UID_BASE`` + a slot, one per concurrent run) in the
  initial user namespace (bubblewrap keeps CAP_SETUID/CAP_SETGID only for the boot
  step that drops to it). As a non-root user bubblewrap adds a user namespace, where the
  process count is per namespace.
- Unsandboxed mode (``allow_unsandboxed=True``, only where bubblewrap cannot run) logs one
  warning and applies the rlimits only: no namespaces, no filesystem or network isolation,
  detached processes can outlive the run, and as root there is no process cap unless the
  interpreter is readable by an unprivileged uid (it is not under /root).
Not covered: judging output (``code_verifier``); seccomp syscall filtering; CPU quotas
across processes (RLIMIT_CPU is per process; the wall deadline bounds the total); memory
of the tmpfs counts against the host, not RLIMIT_AS (it is capped by ``tmpfs_mb``).
"""

from __future__ import annotations

import itertools
import logging
import marshal
import math
import os
import re
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

# The bubblewrap binary; tests monkeypatch this to simulate a host without it.
BWRAP: str = shutil.which("bwrap") or "/usr/bin/bwrap"
# Unprivileged uids/gids (as root) come from [SANDBOX_UID_BASE, SANDBOX_UID_BASE + UID_SLOTS):
# far above any real account, one per concurrent run so their process counts are separate.
SANDBOX_UID_BASE: int = 1_500_000_000
UID_SLOTS: int = 4096
SANDBOX_DIR = "/sandbox"  # where the program's files appear inside the sandbox
_BOX_PREFIX = "prime-sbx-"  # run directories: <tempdir>/prime-sbx-XXXX, removed after each run
_BOOT_NAME = "_boot.py"
_BOOT_CONFIG = "_boot.marshal"
_TEARDOWN_WAIT_S = 2.0  # how long to wait for the killed PID namespace to disappear
_MiB = 1 << 20


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run (each is per process unless said otherwise)."""

    cpu_s: int = 10  # RLIMIT_CPU [s of CPU]; also capped at ceil(timeout_s) + 1
    memory_mb: int = 1024  # RLIMIT_AS, address space [MiB]
    max_procs: int = 64  # RLIMIT_NPROC, processes + threads of the sandbox uid [count]
    file_size_mb: int = 16  # RLIMIT_FSIZE, largest file it may write [MiB]
    open_files: int = 64  # RLIMIT_NOFILE [descriptors]
    stack_mb: int = 64  # RLIMIT_STACK [MiB] (deep recursion in competition code)
    tmpfs_mb: int = 64  # size of the private /tmp, the only writable place [MiB]
    max_output_bytes: int = 1 << 20  # stdout + stderr captured per run before it is killed [bytes]

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive int, got {value!r}")

    def rlimits(self, timeout_s: float) -> dict[str, int]:
        """The rlimits (resource module names -> soft = hard value) for a run of ``timeout_s``."""
        cpu = max(1, min(self.cpu_s, math.ceil(timeout_s) + 1))
        return {
            "RLIMIT_CPU": cpu,
            "RLIMIT_AS": self.memory_mb * _MiB,
            "RLIMIT_NPROC": self.max_procs,
            "RLIMIT_FSIZE": self.file_size_mb * _MiB,
            "RLIMIT_NOFILE": self.open_files,
            "RLIMIT_STACK": self.stack_mb * _MiB,
            "RLIMIT_CORE": 0,
        }


@dataclass(frozen=True)
class RunResult:
    stdout: bytes
    stderr: bytes
    returncode: int | None  # of the sandbox (bubblewrap passes the program's exit code on)
    timed_out: bool  # killed at the wall deadline
    output_overflow: bool  # killed because stdout + stderr exceeded the cap
    elapsed_s: float
    sandboxed: bool  # False only in explicitly allowed unsandboxed mode


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here and unsandboxed mode was not allowed."""


# ---------------------------------------------------------------------------------------
# the boot step: runs first inside the sandbox, then execs the program in-process

_BOOT_SOURCE = r'''
import builtins, marshal, os, resource, sys
with open(sys.argv[1], "rb") as f:  # marshal, not json: importing json costs ~15 ms here
    cfg = marshal.load(f)
for name, value in cfg["rlimits"].items():  # before dropping privileges: root may raise STACK
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["uid"] is not None and os.getuid() == 0:
    os.setgroups([])
    os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
    os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # clears every capability
    if os.getuid() == 0 or os.geteuid() == 0:
        sys.exit("sandbox boot: could not drop root")
os.umask(0o077)
os.chdir(cfg["cwd"])


class _Exit:  # -S leaves out site, which defines exit()/quit(); competition code calls them
    def __repr__(self):
        return "Use exit() to exit"

    def __call__(self, code=None):
        raise SystemExit(code)


builtins.exit = builtins.quit = _Exit()
main = cfg["main"]
sys.argv = [main] + cfg["argv"]
with open(main, encoding="utf-8") as f:
    code = compile(f.read(), main, "exec")
module = type(sys)("__main__")  # registered, as dataclasses and pickle look it up
module.__file__, module.__builtins__ = main, builtins
sys.modules["__main__"] = module
del f, cfg, name, value
exec(code, module.__dict__)
'''


# ---------------------------------------------------------------------------------------
# probing


_probe_cache: dict[tuple[str, str], tuple[bool, str, float]] = {}  # key -> (ok, why, when)
_PROBE_RETRY_S = 30.0
_probe_lock = threading.Lock()
_warned_unsandboxed = False
_uid_counter = itertools.count()

_PROBE_PROGRAM = r'''
import os, socket
open("/tmp/probe", "w").write("x")
assert os.getuid() != 0, "still root"
assert socket.if_nameindex() in ([], [(1, "lo")]), socket.if_nameindex()
print("sandbox-ok", os.getuid())
'''


def interpreter() -> str:
    """The real interpreter behind ``sys.executable`` (not a venv's symlink)."""
    return os.path.realpath(sys.executable)


def _python_roots() -> list[str]:
    """Directories of the Python installation that must be visible (read-only) inside."""
    exe = interpreter()
    roots = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
             os.path.dirname(os.path.dirname(exe))}
    return sorted(r for r in roots if r != "/" and not (r == "/usr" or r.startswith("/usr/")))


def sandbox_available() -> tuple[bool, str]:
    """(True, description) when bubblewrap runs a probe program correctly here.

    A success is cached for the process; a failure is probed again after
    ``_PROBE_RETRY_S`` (a transient failure, e.g. an overloaded host, should not stick).
    """
    key = (BWRAP, interpreter())
    with _probe_lock:
        cached = _probe_cache.get(key)
        if cached is None or (not cached[0] and time.monotonic() - cached[2] > _PROBE_RETRY_S):
            ok, why = _probe(BWRAP)
            cached = _probe_cache[key] = (ok, why, time.monotonic())
            if not ok:
                log.warning("code sandbox unavailable: %s", why)
        return cached[0], cached[1]


def _sweep_stale_boxes(max_age_s: float = 3600.0) -> None:
    """Remove run directories left by callers that were SIGKILLed mid-run (the verifier
    pool kills stuck workers); a run lasts seconds, so an hour-old one is abandoned."""
    now = time.time()
    tmp = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(_BOX_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(tmp, name)
        try:
            if now - os.lstat(path).st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _probe(bwrap: str) -> tuple[bool, str]:
    _sweep_stale_boxes()
    if not (os.path.isfile(bwrap) and os.access(bwrap, os.X_OK)):
        return False, f"bubblewrap not found at {bwrap}"
    try:
        res = _run(bwrap, {"probe.py": _PROBE_PROGRAM}, "probe.py", (), None, 10.0, SandboxLimits())
    except OSError as e:
        return False, f"bubblewrap failed to start: {e}"
    text = res.stdout.decode(errors="replace")
    if res.returncode != 0 or "sandbox-ok" not in text:
        why = (res.stderr.decode(errors="replace").strip() or text.strip())[-500:]
        return False, f"bubblewrap probe failed (rc={res.returncode}, timed_out={res.timed_out}): {why}"
    return True, f"bubblewrap {bwrap}, program uid {text.split()[-1]}"


# ---------------------------------------------------------------------------------------
# running


def run_python(
    files: Mapping[str, str | bytes],
    main: str,
    *,
    argv: Sequence[str] = (),
    stdin: bytes | None = None,
    timeout_s: float,
    limits: SandboxLimits | None = None,
    output_cap: int | None = None,
    allow_unsandboxed: bool = False,
) -> RunResult:
    """Run ``files[main]`` sandboxed; ``files`` are plain names (no directories).

    ``output_cap`` overrides ``limits.max_output_bytes`` for this run (a harness that runs
    several test cases in one sandbox needs room for all of them).
    """
    limits = limits or SandboxLimits()
    ok, why = sandbox_available()
    if ok:
        return _run(BWRAP, files, main, argv, stdin, timeout_s, limits, output_cap)
    if not allow_unsandboxed:
        raise SandboxUnavailable(why)
    _warn_unsandboxed(why)
    return _run(None, files, main, argv, stdin, timeout_s, limits, output_cap)


def _warn_unsandboxed(why: str) -> None:
    global _warned_unsandboxed
    if not _warned_unsandboxed:
        _warned_unsandboxed = True
        log.warning("running model-written code WITHOUT a sandbox (rlimits only): %s", why)


def _next_uid() -> int:
    return SANDBOX_UID_BASE + (os.getpid() * 97 + next(_uid_counter)) % UID_SLOTS


def _write_box(box: str, files: Mapping[str, str | bytes], cfg: dict) -> None:
    """The program's files plus the boot step, readable by the sandbox uid (bound read-only)."""
    os.chmod(box, 0o755)
    for name, content in {**files, _BOOT_NAME: _BOOT_SOURCE, _BOOT_CONFIG: marshal.dumps(cfg)}.items():
        if "/" in name or name.startswith(".") or not name:
            raise ValueError(f"bad sandbox file name {name!r}")
        _write_box_file(box, name, content.encode("utf-8") if isinstance(content, str) else content)


def _write_box_file(box: str, name: str, data: bytes) -> None:
    path = os.path.join(box, name)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)


def _root_binds() -> list[str]:
    """bwrap arguments that build the read-only root: /usr, the top-level links, Python."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for etc in ("/etc/ld.so.cache", "/etc/localtime"):
        args += ["--ro-bind-try", etc, etc]
    made: set[str] = {"/", "/usr", "/tmp", "/proc", "/dev", "/etc"}
    for root in _python_roots():
        parts = root.strip("/").split("/")
        for i in range(1, len(parts)):  # world-traversable parents (e.g. /root is 0700 on host)
            parent = "/" + "/".join(parts[:i])
            if parent not in made:
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", root, root]
        made.add(root)
    return args


def _bwrap_command(bwrap: str, box: str, limits: SandboxLimits, info_fd: int) -> list[str]:
    root = os.geteuid() == 0
    cmd = [bwrap]
    if root:  # no user namespace: the program must run as a real unprivileged uid (NPROC)
        cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-all"]
    cmd += ["--die-with-parent", "--new-session", "--hostname", "sandbox",
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
            "--setenv", "HOME", "/tmp"]
    cmd += _root_binds()
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(limits.tmpfs_mb * _MiB), "--tmpfs", "/tmp",
            "--ro-bind", box, SANDBOX_DIR, "--chdir", "/tmp", "--info-fd", str(info_fd), "--"]
    cmd += [interpreter(), "-I", "-S", "-B", f"{SANDBOX_DIR}/{_BOOT_NAME}", f"{SANDBOX_DIR}/{_BOOT_CONFIG}"]
    return cmd


def _world_readable_path(path: str) -> bool:
    """Whether an unprivileged uid can reach ``path`` (every parent has o+x)."""
    p = os.path.dirname(path)
    while p not in ("/", ""):
        if not os.stat(p).st_mode & 0o001:
            return False
        p = os.path.dirname(p)
    return True


def _run(
    bwrap: str | None,
    files: Mapping[str, str | bytes],
    main: str,
    argv: Sequence[str],
    stdin: bytes | None,
    timeout_s: float,
    limits: SandboxLimits,
    output_cap: int | None = None,
) -> RunResult:
    """One run; ``bwrap=None`` is the unsandboxed mode."""
    start = time.monotonic()
    deadline = start + max(0.0, timeout_s)
    box = tempfile.mkdtemp(prefix=_BOX_PREFIX)
    info_r = info_w = -1
    try:
        root = os.geteuid() == 0
        if bwrap is not None:
            uid = _next_uid() if root else None
            base, cwd = SANDBOX_DIR, "/tmp"
        else:
            drop = root and _world_readable_path(interpreter()) and all(map(_world_readable_path, _python_roots()))
            uid = _next_uid() if drop else None
            base, cwd = box, os.path.join(box, "work")
        cfg = {"rlimits": limits.rlimits(timeout_s), "uid": uid, "cwd": cwd,
               "main": f"{base}/{main}", "argv": list(argv)}
        _write_box(box, files, cfg)
        if stdin is not None:
            _write_box_file(box, "_stdin", stdin)
        if bwrap is None:
            os.mkdir(cwd, 0o700)
            if uid is not None:
                os.chown(cwd, uid, uid)
        stdin_f = open(os.path.join(box, "_stdin"), "rb") if stdin is not None else subprocess.DEVNULL
        try:
            if bwrap is not None:
                info_r, info_w = os.pipe()
                cmd = _bwrap_command(bwrap, box, limits, info_w)
                env = {"PATH": "/usr/bin:/bin"}
                pass_fds: tuple[int, ...] = (info_w,)
            else:
                cmd = [interpreter(), "-I", "-S", "-B", f"{box}/{_BOOT_NAME}", f"{box}/{_BOOT_CONFIG}"]
                env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": cwd}
                pass_fds = ()
            proc = subprocess.Popen(cmd, stdin=stdin_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, cwd=box, start_new_session=True, close_fds=True, pass_fds=pass_fds)
        finally:
            if stdin is not None:
                stdin_f.close()
            if info_w >= 0:
                os.close(info_w)
                info_w = -1
        cap = output_cap if output_cap is not None else limits.max_output_bytes
        return _supervise(proc, info_r, deadline, cap, start, sandboxed=bwrap is not None)
    finally:
        if info_r >= 0:
            os.close(info_r)
        if info_w >= 0:
            os.close(info_w)
        shutil.rmtree(box, ignore_errors=True)


class _NsInit:
    """The sandbox's PID 1 (bubblewrap's child), held through a pidfd once its pid is known."""

    def __init__(self, outer_pid: int) -> None:
        self.outer_pid = outer_pid
        self.info = b""
        self.pidfd: int | None = None

    def feed(self, data: bytes) -> None:
        self.info += data
        if self.pidfd is None:
            m = re.search(rb'"child-pid"\s*:\s*(\d+)', self.info)
            if m:
                self.pidfd = _open_child_pidfd(int(m.group(1)), self.outer_pid)

    def kill(self) -> None:
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, wait_s: float) -> None:
        if self.pidfd is None:
            return
        try:  # readable once it exited, i.e. after every process of its namespace is gone
            select.select([self.pidfd], [], [], wait_s)
        finally:
            os.close(self.pidfd)
            self.pidfd = None


def _open_child_pidfd(pid: int, parent: int) -> int | None:
    """A pidfd for ``pid`` if it is still ``parent``'s child (guards against pid reuse)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        ppid = -1
    if ppid != parent:
        os.close(fd)
        return None
    return fd


def _supervise(proc: subprocess.Popen, info_r: int, deadline: float, cap: int, start: float,
               *, sandboxed: bool) -> RunResult:
    """Collect output until exit, deadline or overflow; then kill and reap everything."""
    ns_init = _NsInit(proc.pid)
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    total = 0
    timed_out = overflow = False
    sel = selectors.DefaultSelector()
    try:
        for fd in chunks:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        if info_r >= 0:
            sel.register(info_r, selectors.EVENT_READ)
        open_streams = len(chunks)
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining):
                fd = key.fd
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(fd)
                    if fd in chunks:
                        open_streams -= 1
                    continue
                if fd == info_r:
                    ns_init.feed(data)
                    continue
                chunks[fd].append(data)
                total += len(data)
                if total > cap:
                    overflow = True
                    open_streams = 0
                    break
        if not (timed_out or overflow):  # streams closed; the program may still be running
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        if info_r >= 0 and ns_init.pidfd is None:
            _drain_info(info_r, ns_init)
    finally:
        sel.close()
        ns_init.kill()  # the PID namespace dies with its PID 1
        _kill_group(proc.pid)
        proc.wait()
        ns_init.wait(_TEARDOWN_WAIT_S)
        _kill_group(proc.pid)
        proc.stdout.close()
        proc.stderr.close()
    out_fd, err_fd = chunks
    return RunResult(
        stdout=b"".join(chunks[out_fd]), stderr=b"".join(chunks[err_fd]),
        returncode=None if (timed_out or overflow) else proc.returncode,
        timed_out=timed_out, output_overflow=overflow,
        elapsed_s=time.monotonic() - start, sandboxed=sandboxed,
    )


def _drain_info(info_r: int, ns_init: _NsInit) -> None:
    try:
        os.set_blocking(info_r, False)
        while True:
            data = os.read(info_r, 4096)
            if not data:
                return
            ns_init.feed(data)
    except (BlockingIOError, OSError):
        return


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
