"""Reading JSON-lines files that another process may still be appending to.

Who calls it: the launcher's live view and summary (``launch.local``), the sweep report,
the evaluator resuming its ``eval.jsonl``. Contract: ``read_rows(path)`` returns one dict per
complete line; a line that does not parse (the one being written) is skipped; a missing file
is an empty list. Not covered: writing (each writer appends whole lines itself).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return rows
