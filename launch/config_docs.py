"""Regenerate docs/config.md from the typed config tree (common/config.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import render_markdown  # noqa: E402

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    out.write_text(render_markdown())
    print(f"wrote {out}")
