"""Every script of launch/ and benchmarks/ starts as a file from any working directory (it
re-runs itself as its module, launch/__init__.py) and keeps its arguments. (The runs of
tests/launch/test_e2e.py import the actors and learner packages through these scripts.)"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for folder in ("launch", "benchmarks") for p in (ROOT / folder).glob("*.py")
                 if p.name not in ("__init__.py", "local.py", "selfcheck.py", "config_docs.py"))  # (no arguments)


@pytest.mark.parametrize("script", SCRIPTS)
def test_starts_as_a_file_from_elsewhere(script, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"usage: {Path(script).name}" in r.stdout


def test_the_rerun_gets_past_its_imports_to_the_config(tmp_path):
    # started as a file from elsewhere, a bad --config is the script's own clear error (exit 2),
    # not an import failure of the re-run
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "learner.py"), "--config", str(tmp_path / "none.yaml")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr, r.stderr[-2000:]
