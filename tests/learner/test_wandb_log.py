"""W&B logging (learner/metrics_log.py with logging.wandb): a real wandb run in offline mode
(no network, no account) under <run_dir>/wandb whose history holds every logged metric per
step (non-finite ones omitted, as JSON gets null) and whose config is the run's; the record
file is read back with wandb's own protobuf schema."""

import json
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from common.config import load_config  # noqa: E402
from learner.metrics_log import MetricsLogger  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: a ':W&B' header, then LevelDB-log framed protobufs
    (32 KiB blocks; per chunk crc32c[4], length[2], type[1]: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:  # zero padding to the block's end
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_offline_wandb_run_holds_the_metrics_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["logging.wandb=true", "prime.beta=0.07"])
    assert cfg.logging.wandb and cfg.logging.wandb_mode == "offline"
    run = tmp_path / "run-a"
    log = MetricsLogger(run, tensorboard=False, console=False, wandb_mode=cfg.logging.wandb_mode,
                        wandb_project=cfg.logging.wandb_project, config=cfg.to_dict())
    log.log(1, {"reward/outcome_mean": 0.5, "loss/policy": float("nan"), "system/version_lag_mean": 0.0}, 1)
    log.log(2, {"reward/outcome_mean": 0.75, "loss/policy": -0.01, "system/version_lag_mean": 1.0}, 2)
    log.close()
    (f,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    recs = wandb_records(f)
    hist = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            hist.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    steps = [h["_step"] for h in hist]
    assert steps == [1, 2], (f.stat().st_size, [r.WhichOneof("record_type") for r in recs])
    assert hist[0]["reward/outcome_mean"] == 0.5 and "loss/policy" not in hist[0]  # NaN left out
    assert hist[1]["loss/policy"] == -0.01 and hist[1]["policy_version"] == 2
    assert hist[1]["system/version_lag_mean"] == 1.0
    (run_rec,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run_rec.config.update}
    assert config["prime"]["beta"] == 0.07 and config["logging"]["wandb"] is True  # the resolved config
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # the JSONL sink is unchanged
