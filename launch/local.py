"""The one-machine PRIME run behind ``launch/run.py``: learner + actors + evaluator, one view.

Who calls it: ``launch/run.py`` (parses the command line, then ``run_local(cfg, ...)``).

Contract
--------
1. Inputs: with ``task.kind == "arithmetic"`` the embedded task is prepared first
   (``prepare_task``: the cached supervised warm-up copied to ``<run_dir>/sft``, the training
   and held-out prompt files), which sets ``model.policy_path`` and, where unset,
   ``actors.prompts_path`` and ``eval.heldout_path``. The resolved config is saved to ``<run_dir>/config.yaml``; every
   process reads that file, so they agree.
2. Processes, each in its own session (process group) with its log in ``<run_dir>/logs/``:
   the learner under ``torchrun --standalone --nproc-per-node N launch/learner.py``, the
   actors through ``actors.supervisor.Supervisor`` (crashed actors restarted with back-off),
   the evaluator (``launch/actors.py --evaluator``).
3. A live view (rich) refreshed every second from ``metrics.jsonl`` and ``eval.jsonl``:
   step, reward, held-out accuracy, tokens/s, version lag, actor restarts.
4. The run ends when the learner exits: the actors get the learner's ``Shutdown``, the
   evaluator scores the final policy; then whatever is still running is stopped
   (SIGTERM, then SIGKILL). Ctrl-C or SIGTERM stops everything the same way. No child
   process outlives ``run_local``. A learner that dies (non-zero exit) is restarted from
   its newest checkpoint (``checkpoint.resume`` set in the saved config) up to
   ``run.max_learner_restarts`` times after ``run.learner_restart_backoff_s``; the actors
   and the evaluator keep running and rejoin the new learner instance (``actors.actor``,
   ``common.transport``): groups in flight are generated again, evaluations continue
   after the last one. Steps trained after that checkpoint are trained again (their
   ``metrics.jsonl`` rows appear twice; the later ones count); the groups the dead learner
   had received and not trained by its checkpoint are gone, and the new learner reports
   how many (``system/groups_lost_in_restart``). The live view and the summary count the restarts.
5. At the end: ``<run_dir>/progress.png`` (reward and held-out accuracy against steps),
   ``<run_dir>/summary.json`` and the printed line
   ``held-out accuracy: A% -> B% in N steps`` (A: the starting policy; B: the mean of
   the last ``eval.last_n`` evaluations; sampled at ``eval.temperature``), greedy beside it,
   then ``wall time: T s (...)``. With ``run.deterministic`` the first line repeats exactly.
6. A run that cannot finish is stopped with an error: when every local actor has exited
   (prompts ran out, or given up after ``actors.max_restarts``) and the learner, short of
   ``run.steps``, trains no new step for ``run.actors_gone_grace_s`` (``_ActorWatch``).
Returns the summary dict; raises ``RuntimeError`` when the learner fails or the run stalls.
Not covered: several machines (start ``launch/learner.py`` with torchrun and
``launch/actors.py`` on each actor host), GPU placement beyond ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.jsonl import read_rows

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def _killpg(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen | None, grace_s: float, name: str) -> None:
    """SIGTERM the process group, wait, then SIGKILL it (always: helpers may outlive the leader)."""
    if proc is None:
        return
    if proc.poll() is None:
        _killpg(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s: SIGKILL", name, grace_s)
    _killpg(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        log.error("%s survived SIGKILL", name)


class _ActorWatch:
    """Tells when a run can no longer finish: every local actor has exited (finished: its
    prompts ran out or it was told to stop; or given up after ``actors.max_restarts``) while the
    learner, short of ``run.steps``, has logged no new step for ``grace_s``. Without this the
    learner would wait for data forever. Runs whose actors live on other hosts (``actors.num``
    = 0 here) are not watched."""

    def __init__(self, num_actors: int, steps: int, grace_s: float):
        self.num_actors, self.steps, self.grace_s = num_actors, steps, grace_s
        self._since: tuple[float, int] | None = None  # (when the actors were all gone, step then)

    def stalled(self, actors_active: bool, step: int, now: float | None = None) -> str | None:
        """None while the run can go on; else why it cannot."""
        now = time.monotonic() if now is None else now
        if actors_active or self.num_actors == 0 or step >= self.steps:
            self._since = None
            return None
        if self._since is None or self._since[1] != step:  # the learner still trains what it has
            self._since = (now, step)
            return None
        if now - self._since[0] < self.grace_s:
            return None
        return (f"every actor has exited while the learner is at step {step} of {self.steps} and has "
                f"trained nothing new for {now - self._since[0]:.0f} s")


def _rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The run's ``metrics.jsonl`` and ``eval.jsonl`` rows, read once per refresh."""
    return read_rows(run_dir / "metrics.jsonl"), read_rows(run_dir / "eval.jsonl")


def summarize(run_dir: Path, last_n: int, steps: int, seconds: float) -> dict:
    """Summary of a finished run from its ``eval.jsonl`` and ``metrics.jsonl``."""
    evals = read_rows(run_dir / "eval.jsonl")
    metrics = read_rows(run_dir / "metrics.jsonl")
    out: dict = {"steps": steps, "seconds": round(seconds, 1), "evaluations": len(evals)}
    if evals:
        tail = evals[-last_n:]
        out["start_accuracy"] = evals[0]["accuracy"]
        out["end_accuracy"] = sum(e["accuracy"] for e in tail) / len(tail)
        if all("greedy_accuracy" in e for e in evals):
            out["start_greedy_accuracy"] = evals[0]["greedy_accuracy"]
            out["end_greedy_accuracy"] = sum(e["greedy_accuracy"] for e in tail) / len(tail)
        out["end_versions"] = [e["policy_version"] for e in tail]
    if metrics:
        out["last_step"] = metrics[-1].get("step")
        out["last_policy_version"] = metrics[-1].get("policy_version")
    return out


def summary_line(s: dict) -> str:
    """The run's result in one line, without wall time (so a deterministic run repeats it
    exactly; the time is printed on the line after it)."""
    if "start_accuracy" not in s:
        return f"held-out accuracy: not evaluated in {s['steps']} steps"
    line = (f"held-out accuracy: {100 * s['start_accuracy']:.1f}% -> {100 * s['end_accuracy']:.1f}% "
            f"in {s['steps']} steps")
    if "start_greedy_accuracy" in s:
        line += (f"; greedy {100 * s['start_greedy_accuracy']:.1f}% -> {100 * s['end_greedy_accuracy']:.1f}%")
    return line


def plot(run_dir: Path) -> Path | None:
    """``progress.png``: outcome reward per step and held-out accuracy per policy version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_rows(run_dir / "metrics.jsonl")
    evals = read_rows(run_dir / "eval.jsonl")
    if not metrics and not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = [m["step"] for m in metrics if m.get("reward/outcome_mean") is not None]
    ys = [m["reward/outcome_mean"] for m in metrics if m.get("reward/outcome_mean") is not None]
    if xs:
        ax.plot(xs, ys, color="tab:gray", alpha=0.6, label="training reward (outcome, after filter)")
    if evals:
        ax.plot([e["policy_version"] for e in evals], [e["accuracy"] for e in evals], "o-", color="tab:blue",
                label="held-out accuracy (sampled)")
        if all("greedy_accuracy" in e for e in evals):
            ax.plot([e["policy_version"] for e in evals], [e["greedy_accuracy"] for e in evals], "s--",
                    color="tab:orange", label="held-out accuracy (greedy)")
    ax.set_xlabel("learner step (= policy version)")
    ax.set_ylabel("accuracy / reward")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"PRIME run {run_dir.name}")
    out = run_dir / "progress.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _view(m: list[dict], e: list[dict], sup, t0: float, steps: int, learner_restarts: int = 0):
    """One line per refresh from the metrics rows ``m`` and evaluation rows ``e``: step,
    version, reward, held-out accuracy, tokens/s, lag, actors."""
    from rich.text import Text

    last = m[-1] if m else {}

    def f(key, fmt="{:.3f}"):
        v = last.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    acc = "-"
    if e:
        acc = f"{e[-1]['accuracy']:.3f}"
        if "greedy_accuracy" in e[-1]:
            acc += f" (greedy {e[-1]['greedy_accuracy']:.3f})"
        acc += f" @v{e[-1]['policy_version']}"
    restarts = sup.restarts() if sup else 0
    return Text(
        f"[{time.time() - t0:5.0f} s] step {last.get('step', 0)}/{steps} | v{last.get('policy_version', 0)} | "
        f"reward {f('reward/outcome_mean')} | held-out {acc} | actor tok/s {f('actor/tokens_per_s', '{:.0f}')} | "
        f"lag {f('system/version_lag_mean', '{:.2f}')} (max {f('system/version_lag_max', '{:.0f}')}) | "
        f"actors {f('actor/count', '{:.0f}')}{f' ({restarts} restarts)' if restarts else ''}"
        f"{f' | learner restarts {learner_restarts}' if learner_restarts else ''}"
    )


def prepare_task(cfg, log_fn=None):
    """Warm up (or fetch from the cache) the embedded task's starting policy into
    ``<run_dir>/sft`` and point the config at it and at the task's prompt files (fields the
    config already sets are kept). Returns ``(cfg, warm-up result)``."""
    from actors.tasks.warmup import warmup

    res = warmup(Path(cfg.run.output_dir) / "sft", cfg.task, cfg.warmup, log_fn=log_fn)
    files = res["prompt_files"]
    upd = {
        "model": cfg.model.model_copy(update={"policy_path": res["model_dir"], "tokenizer_path": None}),
        "actors": cfg.actors.model_copy(update={"prompts_path": cfg.actors.prompts_path or files["train"]}),
        "eval": cfg.eval.model_copy(update={"heldout_path": cfg.eval.heldout_path or files["heldout"]}),
    }
    return cfg.model_copy(update=upd), res


def run_local(cfg, *, nproc_per_node: int = 1, live: bool = True) -> dict:
    """Run PRIME on this machine as described in the module docstring."""
    from rich.console import Console
    from rich.live import Live

    from actors.supervisor import Supervisor
    from common.config import save_resolved

    console = Console()
    t_start = time.time()
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    warm = None
    if cfg.task.kind == "arithmetic":
        console.print("[bold]The embedded arithmetic task[/bold]: supervised warm-up (shipped with the project for the default recipe; other recipes train once, then cached)")
        cfg, warm = prepare_task(cfg, log_fn=console.print)
        how = "shipped model installed" if warm.get("shipped") else "cached" if warm.get("cached") else "trained"
        console.print(f"warm-up: {how}, policy {cfg.model.policy_path}")
    import shutil

    shutil.rmtree(run_dir / "final", ignore_errors=True)  # the learner writes it again at the end
    for name in ("eval.jsonl", "metrics.jsonl"):  # a fresh run directory's files (resume keeps them)
        if not cfg.checkpoint.resume and (run_dir / name).exists():
            (run_dir / name).unlink()
    if cfg.transport.run_id is None:  # every process of this run names it on the wire
        import uuid

        cfg = cfg.model_copy(update={"transport": cfg.transport.model_copy(update={"run_id": uuid.uuid4().hex[:16]})})
    config_path = save_resolved(cfg, run_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    procs: dict[str, subprocess.Popen] = {}
    sup = None
    interrupted = {"sig": None}

    def on_signal(signum, frame):
        interrupted["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def spawn(name, argv, gpus=None):
        penv = dict(env, CUDA_VISIBLE_DEVICES=gpus) if gpus else env
        with open(logs / f"{name}.log", "ab") as out:
            procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=penv,
                                           start_new_session=True, cwd=str(ROOT))
        return procs[name]

    def start_learner(config_path):
        return spawn("learner", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc-per-node={nproc_per_node}", str(ROOT / "launch" / "learner.py"),
                                 "--config", str(config_path)], gpus=cfg.actors.learner_gpus)

    def start_all(config_path):
        """The learner (torchrun), the evaluator and the actors' supervisor, all reading ``config_path``."""
        learner = start_learner(config_path)
        if cfg.eval.every > 0 and cfg.eval.heldout_path:
            spawn("evaluator", [sys.executable, str(ROOT / "launch" / "actors.py"), "--evaluator", "--config",
                                str(config_path)], gpus=(cfg.actors.gpus or "").split(",")[0] or None)
        gpu_ids = cfg.actors.gpus.split(",") if cfg.actors.gpus else None
        return learner, Supervisor(cfg, config_path, log_dir=logs, gpu_ids=gpu_ids).start()

    t0 = time.time()
    rc = None
    stalled = None
    watch = _ActorWatch(cfg.actors.num, cfg.run.steps, cfg.run.actors_gone_grace_s)
    learner_restarts = 0
    try:
        learner, sup = start_all(config_path)
        console.print(f"learner (torchrun, {nproc_per_node} rank(s)), {cfg.actors.num} actor(s)"
                      f"{' and the evaluator' if 'evaluator' in procs else ''} started; logs in {logs}")
        with Live(_view(*_rows(run_dir), sup, t0, cfg.run.steps, learner_restarts), console=console, refresh_per_second=1,
                  transient=not live, auto_refresh=False) as view:
            seen = 0
            while interrupted["sig"] is None:
                rc = learner.poll()
                if rc is not None and rc != 0 and learner_restarts < cfg.run.max_learner_restarts:
                    # the learner died: it restarts from its newest checkpoint; the actors and the
                    # evaluator ride through (they rejoin the new learner instance, actors.actor)
                    learner_restarts += 1
                    console.print(f"[yellow]learner exited with {rc}: restart {learner_restarts}/"
                                  f"{cfg.run.max_learner_restarts} from its newest checkpoint in "
                                  f"{cfg.run.learner_restart_backoff_s:.0f} s[/yellow]")
                    _stop(learner, 15.0, "learner")  # (its process group: nothing of it left)
                    time.sleep(cfg.run.learner_restart_backoff_s)
                    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": True})})
                    config_path = save_resolved(cfg, run_dir)
                    learner = start_learner(config_path)
                    rc = None
                    continue
                if rc is not None:
                    break
                metrics, evals = _rows(run_dir)
                stalled = watch.stalled(sup.poll(), int(metrics[-1]["step"]) if metrics else 0)
                if stalled:
                    break
                for ev in evals[seen:]:  # a permanent line per evaluation, above the live line
                    console.print(f"eval v{ev['policy_version']}: held-out accuracy {ev['accuracy']:.3f}"
                                  + (f", greedy {ev['greedy_accuracy']:.3f}" if "greedy_accuracy" in ev else "")
                                  + f" ({ev['n']} samples, {ev['seconds']:.0f} s)")
                seen = len(evals)
                view.update(_view(metrics, evals, sup, t0, cfg.run.steps, learner_restarts), refresh=True)
                time.sleep(1.0)
            view.update(_view(*_rows(run_dir), sup, t0, cfg.run.steps, learner_restarts), refresh=True)
        console.print()
        if interrupted["sig"] is not None:
            console.print(f"[yellow]signal {interrupted['sig']}: stopping every process[/yellow]")
        elif stalled:
            console.print(f"[red]{stalled}; stopping the run (see {logs}/actor-*.log)[/red]")
        elif rc != 0:
            console.print(f"[red]learner exited with {rc}; see {logs / 'learner.log'}[/red]")
        else:
            ev = procs.get("evaluator")
            if ev is not None:  # it scores the final policy, then exits
                deadline = time.time() + 600
                while ev.poll() is None and time.time() < deadline and interrupted["sig"] is None:
                    time.sleep(0.5)
    finally:
        if sup is not None:
            sup.stop(grace_s=cfg.actors.stop_grace_s + 5)
        for name, p in procs.items():
            _stop(p, 15.0, name)
        for s, h in old.items():
            signal.signal(s, h)
    elapsed = time.time() - t0
    if interrupted["sig"] is not None:
        raise KeyboardInterrupt(f"stopped by signal {interrupted['sig']}")
    if stalled:
        raise RuntimeError(f"{stalled}: the run was stopped; see {logs}/actor-*.log")
    if rc != 0:
        raise RuntimeError(f"the learner exited with {rc}; see {logs / 'learner.log'}")
    metrics = read_rows(run_dir / "metrics.jsonl")
    steps = metrics[-1]["step"] if metrics else 0
    summary = summarize(run_dir, cfg.eval.last_n, steps, elapsed)
    summary["actor_restarts"] = sup.restarts() if sup else 0
    summary["learner_restarts"] = learner_restarts
    if warm is not None:
        summary["warmup"] = {k: warm.get(k) for k in ("key", "cached", "shipped", "model_dir") if k in warm}
        summary["warmup"].update({k: v for k, v in warm.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    summary["wall_s_with_setup"] = round(time.time() - t_start, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    png = plot(run_dir)
    line = summary_line(summary)
    console.print(f"run directory: {run_dir} (plot: {png})")
    print(line, flush=True)
    print(f"wall time: {summary['seconds']:.0f} s ({summary['seconds'] / max(steps, 1):.2f} s/step)"
          f"{'; deterministic mode' if cfg.run.deterministic else ''}", flush=True)
    return summary
