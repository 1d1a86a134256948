"""Warm-up models shipped with the project, so the default run's first start skips training.

Contract
--------
- A shipped entry is ``actors/tasks/shipped/<key>/``: the files of a finished warm-up cache
  entry (``actors.tasks.warmup``: model, tokenizer, ``warmup.json``) less its prompt files,
  plus ``SHA256SUMS`` (``<sha256>  <name>`` per file). ``key`` is the recipe's
  ``warmup.cache_key``, so an entry serves exactly the config that built it.
- Producer: ``launch/warmup.py --ship`` (the project's own warm-up command, then ``export``).
  Consumer: ``warmup.warmup`` on a cache miss: ``verify`` every checksum (a missing, extra or
  altered file is ``ShippedWarmupError``, never a silent fallback), then ``install`` the files
  and regenerate the prompt files (a pure function of the task section) into the cache entry.
- Checked by ``launch/warmup.py --verify``: it retrains the recipe from scratch and compares
  (identical weights on the same CPU kind, torch version and thread count; elsewhere the
  held-out figures within a tolerance), and by ``tests/actors/test_task.py`` (checksums, the key of
  ``configs/tiny.yaml``, the install path).
Not covered: building (``warmup._build``), choosing a recipe.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
SUMS = "SHA256SUMS"
EXCLUDED = ("data",)  # regenerated from the task section on install


class ShippedWarmupError(RuntimeError):
    """A shipped warm-up entry does not match its checksums."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find(key: str, root: Path | None = None) -> Path | None:
    """The shipped entry of recipe ``key`` under ``root`` (default ``SHIPPED_DIR``), or None."""
    d = (root or SHIPPED_DIR) / key
    return d if (d / SUMS).is_file() else None


def read_sums(entry: Path) -> dict[str, str]:
    sums = {}
    for line in (entry / SUMS).read_text().splitlines():
        if line.strip():
            digest, name = line.split(None, 1)
            sums[name.strip()] = digest
    return sums


def verify(entry: Path) -> dict[str, str]:
    """Check every file of ``entry`` against ``SHA256SUMS`` (no file missing, none extra);
    returns the sums. Raises ``ShippedWarmupError``."""
    sums = read_sums(entry)
    present = {p.name for p in entry.iterdir() if p.is_file() and p.name != SUMS}
    if present != set(sums):
        raise ShippedWarmupError(f"{entry}: files {sorted(present)} do not match {SUMS} {sorted(sums)}")
    for name, digest in sums.items():
        got = sha256_file(entry / name)
        if got != digest:
            raise ShippedWarmupError(f"{entry / name}: sha256 {got} != {digest} in {SUMS}")
    return sums


def export(cache_entry: Path, key: str, root: Path | None = None) -> Path:
    """Copy a finished cache entry's files (less the prompt files) to ``root/<key>`` with
    their checksums; returns that folder."""
    dst = (root or SHIPPED_DIR) / key
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    names = sorted(p.name for p in cache_entry.iterdir() if p.is_file() and p.name not in EXCLUDED)
    for name in names:
        shutil.copy2(cache_entry / name, dst / name)
    (dst / SUMS).write_text("".join(f"{sha256_file(dst / n)}  {n}\n" for n in names))
    return dst


def install(entry: Path, dst: Path, task_cfg) -> None:
    """Verify ``entry`` and fill ``dst`` with its files and freshly written prompt files."""
    from actors.tasks import arithmetic as ar

    dst.mkdir(parents=True, exist_ok=True)
    for name in verify(entry):
        shutil.copy2(entry / name, dst / name)
    ar.write_prompt_files(dst / "data", ar.splits_from_config(task_cfg), names=("train", "dev", "heldout"))


def ship(task_cfg, warmup_cfg, log_fn=print, root: Path | None = None) -> Path:
    """Build the recipe (or take it from the cache; never from a shipped entry) and export it
    to ``root/<key>``. Refuses a warm-up that ``max_seconds`` ended: it cannot be rebuilt."""
    from actors.tasks.warmup import cache_key, warmup

    result = warmup(None, task_cfg, warmup_cfg, log_fn=log_fn, use_shipped=False)
    if result.get("stop_reason") == "max_seconds":
        raise ShippedWarmupError("this warm-up was ended by warmup.max_seconds, so nobody can rebuild it: "
                                 "give the recipe a step budget (warmup.max_steps) that ends it first")
    return export(Path(result["cache_dir"]), cache_key(task_cfg, warmup_cfg), root)


def verify_rebuild(task_cfg, warmup_cfg, tol: float = 0.03, log_fn=print, root: Path | None = None) -> dict:
    """Retrain the shipped recipe from scratch (in a temporary cache) and compare it with the
    shipped entry: ``identical`` weights (same sha256), else ``equivalent`` when the held-out
    sampled and greedy accuracies are within ``tol``; ``ok`` is False otherwise."""
    import json
    import tempfile

    from actors.tasks.warmup import RESULT_FILE, cache_key, warmup

    key = cache_key(task_cfg, warmup_cfg)
    entry = find(key, root)
    if entry is None:
        raise ShippedWarmupError(f"no shipped warm-up for recipe {key} under {root or SHIPPED_DIR}")
    sums = verify(entry)
    want = json.loads((entry / RESULT_FILE).read_text())
    with tempfile.TemporaryDirectory(prefix="warmup-verify-") as tmp:
        got = warmup(None, task_cfg, warmup_cfg.model_copy(update={"cache_dir": tmp}), log_fn=log_fn,
                     use_shipped=False)
        digest = sha256_file(Path(got["cache_dir"]) / "model.safetensors")
    diffs = {k: abs(float(got[k]) - float(want[k])) for k in ("heldout_sampled", "heldout_greedy")}
    identical, equivalent = digest == sums["model.safetensors"], max(diffs.values()) <= tol
    return {"key": key, "identical": identical, "equivalent": equivalent, "ok": identical or equivalent,
            "diffs": diffs, "tol": tol,
            "shipped": {k: want[k] for k in ("heldout_sampled", "heldout_greedy", "steps", "stop_reason")},
            "rebuilt": {k: got[k] for k in ("heldout_sampled", "heldout_greedy", "steps", "stop_reason")}}
