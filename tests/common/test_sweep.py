"""Sweeps (common/sweep.py, common/sweep_report.py, launch/sweep.py): sweep files validated
with errors that name the field (a bad override fails before any run); the 95% CI against a
hand-computed case; steps-to-target on a hand-made curve; the report built from finished
runs only (per-seed values, mean ± CI, target from another cell, markdown, PNGs); a finished
run is skipped; the SLURM array script has one task per run with the launcher's command."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from common.sweep import SweepError, emit_slurm, finished, load_sweep, run_command, run_dir, run_sweep
from common.sweep_report import mean_ci95, steps_to, write_report

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(text)
    return p


GOOD = """
name: t
base: configs/tiny.yaml
seeds: [3, 4]
steps: 4
overrides: ["eval.every=2"]
target: {metric: reward/outcome_mean, window: 2, from_cell: b}
cells:
  a: ["prime.use_process_rewards=true"]
  b: ["prime.use_process_rewards=false"]
"""


@pytest.mark.parametrize("text, match", [
    ("cells: {}", "cells"),
    ("cells: {a: [nokey]}", "cells.a"),
    ("cells: {a: ['prime.bta=1']}", r"(?s)cells\.a: .*prime\.bta"),
    ("cells: {a: ['prime.beta=-1']}", r"(?s)cells\.a: .*prime\.beta"),
    ("seeds: [-1]\ncells: {a: []}", "seeds"),
    ("steps: 0\ncells: {a: []}", "steps"),
    ("base: nope.yaml\ncells: {a: []}", "base"),
    ("target: {from_cell: z}\ncells: {a: []}", "target.from_cell"),
    ("target: {value: 1, from_cell: a}\ncells: {a: []}", "target"),
    ("colour: red\ncells: {a: []}", "unknown field"),
])
def test_bad_sweep_files_name_the_field(tmp_path, text, match):
    with pytest.raises(SweepError, match=match):
        load_sweep(write(tmp_path, text))


def test_load_and_command(tmp_path):
    s = load_sweep(write(tmp_path, GOOD), seeds=[7], steps=9)
    assert s.seeds == [7] and s.steps == 9 and s.runs() == [("a", 7), ("b", 7)]
    cmd = run_command(s, "b", 7, tmp_path / "out")
    assert cmd[1].endswith("launch/run.py") and cmd[cmd.index("--steps") + 1] == "9"
    assert cmd[-3:] == ["eval.every=2", "prime.use_process_rewards=false", "run.seed=7"]
    assert cmd[cmd.index("--output-dir") + 1] == str(tmp_path / "out" / "runs" / "b" / "seed7")


def test_mean_ci95_hand_computed():
    # values 1, 2, 3, 4: mean 2.5, sample sd = sqrt(((1.5²+0.5²)·2)/3) = sqrt(5/3) = 1.29099;
    # t_{0.975,3} = 3.182 -> half-width 3.182 · 1.29099 / 2 = 2.05397
    m, ci = mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and abs(ci - 3.182 * math.sqrt(5 / 3) / 2) < 1e-9 and abs(ci - 2.05397) < 1e-5
    assert mean_ci95([0.7]) == (0.7, None) and mean_ci95([]) == (None, None)


def test_steps_to_target_uses_the_smoothed_curve():
    rows = [{"step": i + 1, "r": v} for i, v in enumerate([0.1, 0.9, 0.2, 0.8, 0.9])]
    # window 2 means: 0.1, 0.5, 0.55, 0.5, 0.85 -> first >= 0.55 at step 3; >= 0.8 at step 5
    assert steps_to(rows, "r", 2, 0.55) == 3 and steps_to(rows, "r", 2, 0.8) == 5
    assert steps_to(rows, "r", 1, 0.9) == 2 and steps_to(rows, "r", 2, 0.95) is None


def fake_run(out: Path, cell: str, seed: int, rewards: list[float], acc: float, prm: float | None = None):
    """A finished run directory as launch/run.py leaves it (metrics, eval, summary)."""
    rd = run_dir(out, cell, seed)
    rd.mkdir(parents=True)
    rows = []
    for i, r in enumerate(rewards):
        row = {"step": i + 1, "policy_version": i + 1, "time": 100.0 + 2.0 * i, "reward/outcome_mean": r,
               "system/version_lag_mean": 0.5, "loss/mismatch_kl": 1e-4}
        if prm is not None:
            row["prm/accuracy"] = prm
        rows.append(row)
    (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (rd / "eval.jsonl").write_text(json.dumps({"policy_version": 0, "accuracy": 0.5, "time": 99.0}) + "\n"
                                   + json.dumps({"policy_version": len(rewards), "accuracy": acc, "time": 110.0}) + "\n")
    (rd / "summary.json").write_text(json.dumps({"steps": len(rewards), "seconds": 20.0, "end_accuracy": acc,
                                                 "last_step": len(rewards)}))


def test_report_from_finished_runs(tmp_path):
    s = load_sweep(write(tmp_path, GOOD))
    out = tmp_path / "out"
    fake_run(out, "a", 3, [0.2, 0.6, 0.8, 0.8], 0.70, prm=0.9)
    fake_run(out, "a", 4, [0.2, 0.4, 0.6, 0.8], 0.74, prm=0.8)
    fake_run(out, "b", 3, [0.2, 0.3, 0.5, 0.5], 0.60)
    (run_dir(out, "b", 4)).mkdir(parents=True)  # unfinished: no summary, left out
    summary = write_report(s, out)
    # target = b's final reward (mean of its last 2 steps, one seed) = 0.5
    assert summary["target"]["value"] == pytest.approx(0.5)
    a = summary["cells"]["a"]["figures"]
    # a/seed3 smoothed (w=2): 0.2, 0.4, 0.7 -> step 3; a/seed4: 0.2, 0.3, 0.5 -> step 3
    assert a["steps_to_target"]["per_seed"] == {3: 3, 4: 3}
    assert a["final_heldout_accuracy"]["mean"] == pytest.approx(0.72)
    assert a["final_heldout_accuracy"]["ci95"] == pytest.approx(12.706 * math.sqrt(0.0008) / math.sqrt(2))
    assert a["seconds_per_step"]["mean"] == pytest.approx(2.0) and a["prm_accuracy"]["mean"] == pytest.approx(0.85)
    b = summary["cells"]["b"]
    assert b["runs"] == 1 and b["figures"]["final_heldout_accuracy"]["ci95"] is None
    assert b["figures"]["prm_accuracy"]["n"] == 0
    assert set(summary["figures"]) == {"curves_step.png", "curves_time.png"}
    assert all((out / p).stat().st_size > 1000 for p in summary["figures"])
    md = (out / "summary.md").read_text()
    assert "| a | 2 | 0.720 ± " in md and "(2/2 reached)" in md
    assert finished(out, "a", 3, 4) and not finished(out, "a", 3, 5) and not finished(out, "b", 4, 4)


def test_paired_differences_on_shared_seeds(tmp_path):
    # the target comes from cell b: b is the reference
    out = tmp_path / "out"
    fake_run(out, "a", 3, [0.2, 0.6, 0.8, 0.8], 0.70)
    fake_run(out, "a", 4, [0.2, 0.4, 0.6, 0.8], 0.74)
    fake_run(out, "a", 5, [0.2, 0.4, 0.6, 0.8], 0.99)  # b has no seed 5: not paired
    fake_run(out, "b", 3, [0.2, 0.3, 0.5, 0.5], 0.60)
    fake_run(out, "b", 4, [0.2, 0.3, 0.5, 0.7], 0.70)
    summary = write_report(load_sweep(write(tmp_path, GOOD), seeds=[3, 4, 5]), out)
    p = summary["paired"]
    assert p["reference"] == "b" and set(p["cells"]) == {"a"}
    acc = p["cells"]["a"]["final_heldout_accuracy"]
    # a − b per seed: 0.70 − 0.60 = 0.10, 0.74 − 0.70 = 0.04; mean 0.07, sd sqrt(0.0018)
    assert acc["per_seed"] == {3: pytest.approx(0.10), 4: pytest.approx(0.04)} and acc["n"] == 2
    assert acc["mean"] == pytest.approx(0.07) and acc["ci95"] == pytest.approx(12.706 * math.sqrt(0.0018) / math.sqrt(2))
    rew = p["cells"]["a"]["final_train_reward"]  # last 2 steps: a (0.8, 0.7), b (0.5, 0.6) -> 0.3, 0.1
    assert rew["per_seed"] == {3: pytest.approx(0.3), 4: pytest.approx(0.1)}
    assert "Paired on seed against `b`" in (out / "summary.md").read_text()


def test_finished_runs_are_skipped(tmp_path):
    s = load_sweep(write(tmp_path, GOOD), seeds=[3])
    out = tmp_path / "out"
    fake_run(out, "a", 3, [0.2, 0.6, 0.8, 0.8], 0.70)
    fake_run(out, "b", 3, [0.2, 0.3, 0.5, 0.5], 0.60)
    said = []
    summary = run_sweep(s, out, log=said.append)  # nothing to run: no launcher is started
    assert "2 already finished, 0 to run" in said[0] and len(said) == 1
    assert summary["cells"]["b"]["runs"] == 1


def test_emit_slurm_one_task_per_run(tmp_path):
    s = load_sweep(write(tmp_path, GOOD))
    path = emit_slurm(s, "runs/sweeps/t", tmp_path / "sweep.sbatch", "sweep.yaml")
    text = path.read_text()
    assert "#SBATCH --array=0-3" in text and text.count(") exec .venv/bin/python launch/run.py") == 4
    assert "run.seed=4" in text and "runs/sweeps/t/runs/b/seed4" in text
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_cli_report_and_bad_file(tmp_path):
    bad = write(tmp_path, "cells: {a: ['prime.bta=1']}")
    r = subprocess.run([sys.executable, "launch/sweep.py", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "prime.bta" in r.stderr


def test_only_some_cells_keeps_the_target_cell(tmp_path):
    s = load_sweep(write(tmp_path, GOOD), only=["a"])
    assert list(s.cells) == ["a", "b"]  # b is the target's reference
    with pytest.raises(SweepError, match="--cells"):
        load_sweep(write(tmp_path, GOOD), only=["zz"])


@pytest.mark.parametrize("preset", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_presets_load_and_every_cell_is_a_valid_config(preset):
    s = load_sweep(preset)  # each cell's overrides are checked against the config schema
    assert len(s.seeds) >= 3 and s.target is not None
    if preset.stem == "prm":  # the offline cell takes the PRM fitted beside a frozen policy (cells run in order)
        assert list(s.cells).index("offline-fit") < list(s.cells).index("offline")
        assert "optim.policy.lr=0" in s.cells["offline-fit"]
        cmd = run_command(s, "offline", 2, Path("/o"))
        assert "model.prm_path=/o/runs/offline-fit/seed2/final_prm" in cmd and "run.seed=2" in cmd
    if preset.stem == "staleness":
        assert {"eta0-sync", "eta4-none", "eta4-decoupled", "eta8-icepop"} <= set(s.cells)
        assert "async.actor_lag=3" in s.cells["eta4-seq_mask"]
