"""Regenerate docs/config.md from the typed config tree (common/config.py)."""

from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a file: re-run as a module (launch/__init__.py)
    __import__("launch").as_module(__file__)

from common.config import render_markdown  # noqa: E402

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    out.write_text(render_markdown())
    print(f"wrote {out}")
