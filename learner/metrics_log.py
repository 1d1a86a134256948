"""Metrics sinks of the learner (rank 0 only): TensorBoard, a JSONL file, a console line.

Contract: ``log(step, metrics)`` takes namespaced scalar metrics (``loss/``, ``reward/``,
``prm/``, ``actor/``, ``system/``, ``time/``) and writes each to
``<run_dir>/tb`` (TensorBoard event files) and one JSON line per step to
``<run_dir>/metrics.jsonl`` (``{"step": .., "policy_version": .., "time": .., <metrics>}``).
Non-finite values are written as they are (TensorBoard shows them; JSON gets null) so a
diverging run is visible, never silently dropped. With ``logging.wandb`` the same rows go
to Weights & Biases (offline by default: ``<run_dir>/wandb``; non-finite values omitted there).
Not covered: what the metrics mean.
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
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, console: bool = True,
                 wandb_mode: str | None = None, wandb_project: str = "prime-async", config: dict | None = None):
        """``wandb_mode`` ('offline' | 'online'; None = no W&B): also log to Weights & Biases,
        the run named after ``run_dir``, ``config`` (the resolved run config) attached."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (self.run_dir / "metrics.jsonl").open("a", buffering=1)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        self.wb = None
        if wandb_mode is not None:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("logging.wandb=true needs the wandb package: pip install -e '.[wandb]'") from e
            self.wb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(self.run_dir),
                                 name=self.run_dir.name, config=config or {})
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
        if self.wb is not None:
            self.wb.log({"policy_version": policy_version, **{k: v for k, v in row.items() if k not in ("step", "time")
                                                               and v is not None}}, step=step)
        if self.writer is not None:
            self.writer.flush()
        if self.console:
            parts = [f"step {step}"] + [f"{label} {fmt.format(metrics[k])}" for k, label, fmt in CONSOLE_KEYS if k in metrics]
            print(" | ".join(parts), flush=True)

    def close(self) -> None:
        self.jsonl.close()
        if self.wb is not None:
            import wandb

            self.wb.finish()
            self.wb = None
            # finish() can return before wandb's service has flushed the run file (seen under
            # load: only the 7-byte header on disk); teardown waits for the service to exit
            wandb.teardown()
        if self.writer is not None:
            self.writer.close()


# actor metrics summed over actors (rates, counters); every other actor/ metric is averaged
_ACTOR_SUMS = ("actor/tokens_per_s", "actor/groups_sent", "actor/groups_dropped_verifier", "actor/groups_dropped_stop",
               "actor/prompts_skipped", "actor/weight_updates", "actor/tokens", "actor/cpu_s")


def actor_metrics(info: dict[str, dict]) -> dict[str, float]:
    """``actor/*`` metrics of the live actors (``LearnerServer.actor_info()``): totals for
    rates and counters, means otherwise, plus ``actor/version_lag_max``. The evaluator
    client (no groups, no actor metrics) contributes nothing."""
    rows = [r["metrics"] for r in info.values() if r.get("alive") and r.get("metrics")]
    rows = [r for r in rows if any(k.startswith("actor/") for k in r)]
    out: dict[str, float] = {}
    if not rows:
        return out
    keys = sorted({k for r in rows for k in r if k.startswith("actor/")})
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r]
        out[k] = sum(vals) if k in _ACTOR_SUMS else sum(vals) / len(vals)
    lags = [float(r["actor/version_lag"]) for r in rows if "actor/version_lag" in r]
    if lags:
        out["actor/version_lag_max"] = max(lags)
    out["actor/count"] = float(len(rows))
    return out


def weight_sync_metrics(sender, st) -> dict[str, float]:
    """``system/weight_sync/*`` of one send: bytes, receivers served and failed; for gloo/nccl
    also the members now and the sender's running counts (joined, dropped, catch-ups)."""
    out = {"system/weight_sync/bytes": float(st.bytes), "system/weight_sync/receivers": float(st.receivers),
           "system/weight_sync/failed": float(st.failed)}
    counts = getattr(sender, "counts", None)
    if counts is not None:
        out["system/weight_sync/members"] = float(len(sender.members()))
        for k in ("joined", "dropped", "catch_ups"):
            out[f"system/weight_sync/{k}_total"] = float(counts[k])
    return out
