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
- ``save_model_opt`` / ``load_model_opt``: a model's whole weights and its optimiser state
  for a checkpoint (FSDP2: collectives, rank 0 gets them), loadable in either mode and at any
  world size (optimiser state by integer ids from DDP/plain, by parameter names from FSDP2;
  converted by parameter order). ``groups_lost_since``: what a learner that died had
  received after its last checkpoint, from its metrics file.
Not covered: what goes into ``state`` (the trainer decides), per-rank sharded checkpoint
files.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from common.jsonl import read_rows
from learner.distributed import is_sharded
from learner.models import _full_options, full_state_dict, unwrap

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


def _opt_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    """Per param group, the fully-qualified names of the optimiser's parameters in order
    (the keys torch.distributed.checkpoint uses; tied weights under their first name)."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def _opt_ids_to_names(sd: dict, names: list[list[str]]) -> dict:
    """optimizer.state_dict() (integer ids) -> name-keyed, by position in the groups."""
    state, groups = {}, []
    for g, gnames in zip(sd["param_groups"], names):
        for pid, name in zip(g["params"], gnames):
            if pid in sd["state"]:
                state[name] = sd["state"][pid]
        groups.append({**g, "params": list(gnames)})
    return {"state": state, "param_groups": groups}


def _opt_names_to_ids(sd: dict) -> dict:
    """Name-keyed optimiser state -> the integer ids optimizer.load_state_dict expects
    (ids numbered through the groups in order, as optimizer.state_dict() does)."""
    state, groups, i = {}, [], 0
    for g in sd["param_groups"]:
        ids = []
        for name in g["params"]:
            if name in sd["state"]:
                state[i] = sd["state"][name]
            ids.append(i)
            i += 1
        groups.append({**g, "params": ids})
    return {"state": state, "param_groups": groups}


def save_model_opt(model, opt) -> tuple[dict, dict]:
    """Whole weights and optimiser state (FSDP2: collective; rank 0 gets them)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return full_state_dict(model), get_optimizer_state_dict(model, opt, options=_full_options())
    return unwrap(model).state_dict(), opt.state_dict()


def load_model_opt(model, opt, weights: dict, opt_state: dict) -> None:
    """Inverse of ``save_model_opt`` on every rank, accepting either optimiser format."""
    ids_format = any(isinstance(p, int) for g in opt_state["param_groups"] for p in g["params"])
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=full)
        if ids_format:
            opt_state = _opt_ids_to_names(opt_state, _opt_names(model, opt))
        set_optimizer_state_dict(model, opt, opt_state, options=full)
    else:
        unwrap(model).load_state_dict(weights)
        opt.load_state_dict(opt_state if ids_format else _opt_names_to_ids(opt_state))


def groups_lost_since(metrics_path: Path, step: int, received_at_step: int) -> tuple[int, int]:
    """(Groups a learner that died had received after checkpoint ``step`` (``received_at_step``
    then), the loss it had itself counted in earlier restarts): from its last ``metrics.jsonl``
    row past that step. Groups received after that row was written cannot be known (at most
    one step's worth)."""
    rows = [r for r in read_rows(metrics_path) if r.get("step", 0) > step and "system/groups_received" in r]
    if not rows:
        return 0, 0
    last = rows[-1]
    return (max(0, int(last["system/groups_received"] or 0) - int(received_at_step)),
            int(last.get("system/groups_lost_in_restart") or 0))
