"""Fixtures shared across the suite. The tree of tests mirrors the tree of code:
tests/common/, tests/actors/, tests/learner/, tests/launch/, tests/benchmarks/; whole-system
runs (several processes, the README's commands) are in tests/launch/; repository-wide rules in
tests/test_layout.py. This file puts tests/ on the import path (pytest's default import mode),
so every test imports the shared helpers as ``synthetic`` and ``pool_kinds``."""

import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch


@pytest.fixture
def shm_channel(tmp_path):
    """(shm_dir, channel) for the shm weight channel: the real /dev/shm where there is one, a
    unique channel name, its folders removed afterwards."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    channel = f"test-{uuid.uuid4().hex[:10]}"
    yield base, channel
    for p in Path(base).glob(f"prime-ws-{channel}*"):
        shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for in-process torch work (HF engine, learner forwards): on a
    shared 2-core box two OpenMP threads stall whenever another process holds a core
    (measured: a 9x576x1536 matmul 0.5 ms with one thread, 8 ms with two). vLLM's own
    worker threads are set by VLLM_CPU_OMP_THREADS_BIND and are not affected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def needs_sandbox():
    """Skip where bubblewrap is not installed; fail where it is installed but not working."""
    from actors.verifiers.sandbox import sandbox_available

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    ok, why = sandbox_available()
    assert ok, why
