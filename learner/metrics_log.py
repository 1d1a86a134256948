"""Metrics sinks of the learner (rank 0 only): TensorBoard, a JSONL file, a console line.

Contract: ``log(step, metrics)`` takes namespaced scalar metrics (``loss/``, ``reward/``,
``prm/``, ``actor/``, ``system/``, ``time/``) and writes each to
``<run_dir>/tb`` (TensorBoard event files) and one JSON line per step to
``<run_dir>/metrics.jsonl`` (``{"step": .., "policy_version": .., "time": .., <metrics>}``).
Non-finite values are written as they are (TensorBoard shows them; JSON gets null) so a
diverging run is visible, never silently dropped. Not covered: what the metrics mean.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

CONSOLE_KEYS = (
    ("reward/outcome_mean", "reward", "{:.3f}"),
    ("prm/accuracy", "prm acc", "{:.2f}"),
    ("loss/policy", "pg loss", "{:+.4f}"),
    ("system/version_lag_mean", "lag", "{:.2f}"),
    ("system/tokens_per_s", "tok/s", "{:.0f}"),
)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, console: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.run_dir / "metrics.jsonl").open("a", buffering=1)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        self.console = console
        self.t0 = time.time()

    def log(self, step: int, metrics: dict[str, float], policy_version: int | None = None) -> None:
        row = {"step": step, "policy_version": policy_version, "time": round(time.time() - self.t0, 3)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else None
            if self.writer is not None:
                self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps(row) + "\n")
        if self.writer is not None:
            self.writer.flush()
        if self.console:
            parts = [f"step {step}"] + [f"{label} {fmt.format(metrics[k])}" for k, label, fmt in CONSOLE_KEYS if k in metrics]
            print(" | ".join(parts), flush=True)

    def close(self) -> None:
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
