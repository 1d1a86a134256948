"""Learner checkpoints: atomic, last-k, loadable without unpickling arbitrary objects.

Contract
--------
- ``save_checkpoint(dir, step, state)`` writes ``<dir>/step_<step:08d>/state.pt`` via a
  temp directory renamed into place (a crash leaves the previous checkpoints intact, never
  a half-written one) and deletes all but the newest ``keep_last``.
- ``state`` is a dict of tensors, state dicts, numbers, strings, lists and dicts of these;
  encoded trajectory groups (pending buffer) are stored as uint8 tensors. Loading uses
  ``torch.load(weights_only=True)``: a checkpoint file cannot execute code.
- ``rng_state()`` / ``set_rng_state()`` capture torch, numpy and Python RNGs in that
  restricted format, so a resumed run draws the same numbers.
Not covered: what goes into ``state`` (the trainer decides; with FSDP2 it gathers full,
unsharded state dicts first), per-rank sharded checkpoint files.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if _STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict, keep_last: int = 2) -> Path:
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:08d}"
    tmp = d / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(d)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> dict:
    """Load ``state.pt`` from a checkpoint directory (or the newest under a parent dir)."""
    p = Path(path)
    if not (p / "state.pt").is_file():
        found = list_checkpoints(p)
        if not found:
            raise FileNotFoundError(f"no checkpoint under {p}")
        p = found[-1]
    return torch.load(p / "state.pt", weights_only=True, map_location="cpu")


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def bytes_to_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()
