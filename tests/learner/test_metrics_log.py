"""learner/metrics_log.py writes real TensorBoard event files and a JSONL row per step."""

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from learner.metrics_log import MetricsLogger


def test_tensorboard_and_jsonl(tmp_path, capsys):
    log = MetricsLogger(tmp_path, tensorboard=True, console=True)
    log.log(0, {"reward/outcome_mean": 0.25, "loss/policy": -0.5, "system/version_lag_mean": 1.0}, policy_version=1)
    log.log(1, {"reward/outcome_mean": 0.5, "loss/policy": float("nan")}, policy_version=2)
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["policy_version"] == 2
    assert rows[1]["loss/policy"] is None  # NaN is visible as null, not dropped
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("reward/outcome_mean")] == [0.25, 0.5]
    assert "step 0 | reward 0.250" in capsys.readouterr().out
