"""Embedded tasks: procedurally generated problems the default CPU run trains on, offline.

Who calls it: the warm-up (``actors.tasks.warmup``), the launcher (prompt files for the
actors and the held-out evaluation), tests. ``arithmetic`` is the only task kind so far;
``warmup`` trains its supervised starting policy. Nothing here downloads anything.
Not covered: real datasets (see ``actors.prompts`` and ``actors.eval``).
"""

from actors.tasks.arithmetic import (
    Problem,
    build_tokenizer,
    demonstrations,
    diagnose,
    make_splits,
    write_prompt_files,
)

__all__ = ["Problem", "build_tokenizer", "demonstrations", "diagnose", "make_splits", "write_prompt_files"]
