"""Entry points: thin scripts that parse the command line, load the config and call one function.
The one-machine launcher behind ``launch/run.py`` is ``launch/local.py``; the setup self-check is
``launch/selfcheck.py``. Nothing under ``actors/``, ``learner/`` or ``common/`` imports this package.

Every script here (and under ``benchmarks/``) is a module of its package, also when it is started
as a file (``python launch/run.py``, ``torchrun launch/learner.py``, as the README shows): such a
script calls :func:`as_module` first, which re-executes it as ``python -m launch.run``. The reason:
Python puts a script's own folder first on the import path, and there ``launch/actors.py`` and
``launch/learner.py`` would stand in for the ``actors`` and ``learner`` packages. The new process
keeps the pid (torchrun and the supervisors watch it), the arguments, the environment and the
interpreter flags; ``PYTHONPATH`` gets the checkout's root in front, so the process and every
process it starts import this checkout's code, even when another checkout is the one installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def as_module(script_file: str) -> None:
    """Replace this process by ``python -m <package>.<script>`` for the file ``script_file``
    (``__file__`` of a script started as a file). Does not return."""
    path = Path(script_file).resolve()
    root = path.parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # the interpreter's flags (-O, -X ..., -W ...), as multiprocessing passes them on; -u separately
    flags = subprocess._args_from_interpreter_flags()
    if getattr(sys.stdout, "write_through", False) and "-u" not in flags:
        flags.append("-u")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *flags, "-m", f"{path.parent.name}.{path.stem}", *sys.argv[1:]], env)
