"""The bubblewrap sandbox itself: identity, environment, filesystem, network, each rlimit,
the output cap, teardown (no process survives a run, nor the death of its caller), the
unsandboxed fallback, and the per-run overhead."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from actors.verifiers import sandbox
from actors.verifiers.sandbox import RunResult, SandboxLimits, SandboxUnavailable, run_python, sandbox_available

pytestmark = pytest.mark.usefixtures("needs_sandbox")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[2]


def run(code: str, timeout_s: float = 5.0, **kw) -> RunResult:
    return run_python({"main.py": textwrap.dedent(code)}, "main.py", timeout_s=timeout_s, **kw)


def out(res: RunResult) -> str:
    assert res.returncode == 0, (res.returncode, res.stderr.decode(errors="replace")[-2000:])
    return res.stdout.decode()


def sandbox_pids() -> list[int]:
    lo, hi = sandbox.SANDBOX_UID_BASE, sandbox.SANDBOX_UID_BASE + sandbox.UID_SLOTS
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if lo <= os.stat(f"/proc/{entry}").st_uid < hi:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def wait_no_leftovers(wait_s: float = 1.0) -> None:
    deadline = time.monotonic() + wait_s
    while sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_pids() == []


def test_limits_are_validated_and_frozen():
    with pytest.raises(ValueError):
        SandboxLimits(cpu_s=0)
    lim = SandboxLimits()
    with pytest.raises(AttributeError):
        lim.cpu_s = 3  # type: ignore[misc]
    assert lim.rlimits(2.0)["RLIMIT_CPU"] == 3  # capped at ceil(timeout) + 1
    assert lim.rlimits(100.0)["RLIMIT_CPU"] == lim.cpu_s


def test_basic_run_stdin_argv_and_exit_code():
    res = run_python({"main.py": "import sys\nprint(sys.stdin.read()[::-1], sys.argv[1:])\nsys.exit(3)"},
                     "main.py", argv=["a", "b"], stdin=b"abc", timeout_s=5)
    assert res.sandboxed and not res.timed_out
    assert res.returncode == 3
    assert res.stdout.decode() == "cba ['a', 'b']\n"


def test_identity_environment_and_capabilities():
    text = out(run("""
        import os, socket
        status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
        print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())
        print(sorted(os.environ))
        print(socket.gethostname(), os.getpid())
        print(status["CapEff"].strip(), status["CapPrm"].strip(), status["NoNewPrivs"].strip())
    """))
    ids, env, host, caps = text.splitlines()
    uid, euid, gid, groups = ids.split(" ", 3)
    assert int(uid) == int(euid) == int(gid) >= sandbox.SANDBOX_UID_BASE
    assert groups == "[]"
    assert env == str(sorted(["HOME", "LANG", "PATH", "PWD"]))
    assert host.split()[0] == "sandbox" and int(host.split()[1]) <= 3  # own PID namespace
    assert caps.split() == ["0000000000000000", "0000000000000000", "1"]


def test_concurrent_runs_get_distinct_uids():
    with ThreadPoolExecutor(4) as ex:
        uids = list(ex.map(lambda _: out(run("import os, time; time.sleep(0.3); print(os.getuid())")), range(4)))
    assert len(set(uids)) == 4


def test_filesystem_read_only_private_and_capped(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    text = out(run(f"""
        import os
        results = []
        for path in ("/usr/pwned", "/sandbox/pwned", "/pwned", "/etc/pwned", {str(ROOT / "pwned")!r}):
            try:
                open(path, "w").write("x")
                results.append("wrote " + path)
            except OSError as e:
                results.append("refused")
        print(results)
        print(os.path.exists({str(secret)!r}), os.path.exists({str(ROOT)!r}), os.path.exists("/home"),
              os.path.exists("/etc/passwd"), os.path.exists("/root/.ssh"))
        open("/tmp/ok", "w").write("fine")
        print(open("/tmp/ok").read())
    """))
    writes, visible, tmp = text.splitlines()
    assert writes == str(["refused"] * 5)
    assert visible == "False False False False False"
    assert tmp == "fine"
    assert not (ROOT / "pwned").exists()


def test_tmpfs_size_and_file_size_limits():
    fill = """
        import errno
        try:
            with open("/tmp/big", "wb") as f:
                for _ in range(8):
                    f.write(b"x" * (1 << 20))
            print("wrote 8 MiB")
        except OSError as e:
            print(errno.errorcode[e.errno])
    """
    assert out(run(fill, limits=SandboxLimits(tmpfs_mb=2))).strip() == "ENOSPC"
    assert out(run(fill, limits=SandboxLimits(file_size_mb=2))).strip() == "EFBIG"
    assert out(run(fill)).strip() == "wrote 8 MiB"


def test_network_isolated():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        server.setblocking(False)
        port = server.getsockname()[1]
        text = out(run(f"""
            import socket
            print(socket.if_nameindex())
            for host in ("127.0.0.1", "10.0.0.1", "1.1.1.1"):
                try:
                    socket.create_connection((host, {port}), timeout=0.5)
                    print("connected", host)
                except OSError as e:
                    print("refused", host)
        """))
        with pytest.raises(BlockingIOError):
            server.accept()
    lines = text.splitlines()
    assert lines[0] == "[(1, 'lo')]"
    assert all(line.startswith("refused") for line in lines[1:])


def test_process_cap_holds_as_root():
    # RLIMIT_NPROC is ignored for uid 0: this only holds because the program runs unprivileged
    res = run("""
        import os, time
        n = 0
        for _ in range(200):
            try:
                if os.fork() == 0:
                    time.sleep(3)
                    os._exit(0)
                n += 1
            except OSError:
                break
        print(n)
    """, limits=SandboxLimits(max_procs=16), timeout_s=2)
    assert int(res.stdout.decode().split()[0]) <= 15  # the program itself is one of the 16
    wait_no_leftovers()


def test_open_files_cap():
    n = int(out(run("""
        import os
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        print(len(fds))
    """, limits=SandboxLimits(open_files=32))))
    assert 20 < n < 32


def test_cpu_limit_kills_before_wall_deadline():
    res = run("while True:\n    pass", timeout_s=8, limits=SandboxLimits(cpu_s=1))
    assert not res.timed_out and res.returncode not in (0, None)
    assert res.elapsed_s < 6


def test_memory_limit():
    res = run("x = bytearray(2 * 1024 ** 3)", limits=SandboxLimits(memory_mb=512))
    assert res.returncode == 1 and b"MemoryError" in res.stderr


def test_output_cap_kills_the_flood():
    res = run("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)", timeout_s=5,
              limits=SandboxLimits(max_output_bytes=1 << 20))
    assert res.output_overflow and not res.timed_out
    assert len(res.stdout) + len(res.stderr) <= (1 << 20) + (1 << 16)
    assert res.elapsed_s < 2


def test_timeout_kills_every_process_also_detached_ones():
    marker = f"prime-sandbox-{uuid.uuid4().hex}"
    res = run(f"""
        import os, time
        for _ in range(3):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execv("/bin/sh", ["sh", "-c", "sleep 30", {marker!r}])
                os._exit(0)
        time.sleep(30)
    """, timeout_s=1.0)
    assert res.timed_out and res.elapsed_s < 2.0
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert found.stdout.strip() == ""
    wait_no_leftovers(0.2)


def test_program_is_not_on_any_command_line():
    marker = f"prime-cmdline-{uuid.uuid4().hex}"
    seen = []

    def scan():
        time.sleep(0.4)
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        seen.append(entry)
            except OSError:
                pass

    t = threading.Thread(target=scan)
    t.start()
    res = run(f"import time\n# {marker}\ntime.sleep(1)\nprint('done')")
    t.join()
    assert out(res).strip() == "done"
    assert seen == []


def test_killing_the_caller_tears_the_sandbox_down(tmp_path):
    # the verifier pool SIGKILLs a stuck worker: its sandbox must die with it (--die-with-parent)
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from actors.verifiers.sandbox import run_python
        print("start", flush=True)
        run_python({{"main.py": "while True:\\n    pass"}}, "main.py", timeout_s=60)
    """))
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              env={**os.environ, "TMPDIR": str(tmp_path)})  # it cannot clean up
    try:
        assert worker.stdout.readline().strip() == b"start"
        deadline = time.monotonic() + 30  # start-up (its first bwrap probe) is slow on a loaded host
        while not sandbox_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox_pids(), "the sandboxed program never started"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        worker.stdout.close()
    wait_no_leftovers(2.0)


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists() or not shutil.which("setpriv"),
                    reason="needs root (to become nobody), /usr/bin/python3 and setpriv")
def test_non_root_caller_uses_a_user_namespace():
    # as an ordinary user bubblewrap adds a user namespace; the process cap still holds there
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("sb", {str(ROOT / "actors" / "verifiers" / "sandbox.py")!r})
        sb = importlib.util.module_from_spec(spec)
        sys.modules["sb"] = sb
        spec.loader.exec_module(sb)
        assert sb.sandbox_available()[0], sb.sandbox_available()
        prog = "import os\\nn = 0\\nwhile True:\\n    try:\\n        if os.fork() == 0:\\n" \\
               "            import time; time.sleep(3); os._exit(0)\\n        n += 1\\n" \\
               "    except OSError:\\n        break\\nprint(os.getuid(), n)"
        r = sb.run_python({{"m.py": prog}}, "m.py", timeout_s=2, limits=sb.SandboxLimits(max_procs=16))
        print(r.stdout.decode().strip())
    """)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    res = subprocess.run([*nobody, "/usr/bin/python3", "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    uid, forks = map(int, res.stdout.split())
    assert uid == 65534 and 0 < forks < 16, res.stdout


def test_stale_run_directories_are_swept(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox.tempfile, "gettempdir", lambda: str(tmp_path))
    old, new = tmp_path / "prime-sbx-old", tmp_path / "prime-sbx-new"
    for d in (old, new):
        d.mkdir()
        (d / "main.py").write_text("pass")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    sandbox._sweep_stale_boxes()
    assert not old.exists() and new.exists()


def test_unavailable_raises_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "BWRAP", "/nonexistent/bwrap")
    ok, why = sandbox_available()
    assert not ok and "not found" in why
    with pytest.raises(SandboxUnavailable):
        run("print(1)")
    res = run("print(1)", allow_unsandboxed=True)
    assert not res.sandboxed and out(res) == "1\n"
    res = run("x = bytearray(2 * 1024 ** 3)", allow_unsandboxed=True, limits=SandboxLimits(memory_mb=512))
    assert b"MemoryError" in res.stderr  # rlimits still apply


def test_probe_failure_is_reported(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "BWRAP", str(fake))
    ok, why = sandbox_available()
    assert not ok and "Permission denied" in why


def test_per_run_overhead():
    n = 10
    exe = sandbox.interpreter()
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run([exe, "-I", "-S", "-B", "-c", "pass"], check=True)
    bare = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        out(run("pass"))
    boxed = (time.perf_counter() - t0) / n
    print(f"per run: bare interpreter {bare * 1000:.0f} ms, sandboxed {boxed * 1000:.0f} ms, "
          f"overhead {(boxed - bare) * 1000:.0f} ms")
    assert boxed < 1.0
