"""The house rules of docs/architecture.md, read from the source (every import statement, also
the ones inside functions):

- `common/` is the floor: it imports nothing from `actors`, `learner`, `launch` or `benchmarks`;
- `actors/` and `learner/` meet only on the wire: neither imports the other (nor `launch`);
- nothing outside `benchmarks/` imports `benchmarks`;
- no code folder edits `sys.path` (scripts run as modules of their package: launch/__init__.py);
- no module outside tests/ is over 700 lines.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("actors", "learner", "common", "launch", "benchmarks")
FORBIDDEN = {                      # folder -> top-level packages it must not import
    "common": {"actors", "learner", "launch", "benchmarks"},
    "actors": {"learner", "launch", "benchmarks"},
    "learner": {"actors", "launch", "benchmarks"},
    "launch": {"benchmarks"},
    "benchmarks": set(),
}
MAX_LINES = 700


def _modules():
    for folder in CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield folder, path


def imported_packages(tree: ast.AST) -> set[str]:
    """Top-level package of every absolute import in ``tree``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def edits_sys_path(tree: ast.AST) -> list[int]:
    """Lines that change ``sys.path`` (a method call on it, or an assignment to it)."""
    lines = []
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t.value if isinstance(t, ast.Subscript) else t for t in targets), None)
        if (isinstance(target, ast.Attribute) and target.attr == "path"
                and isinstance(target.value, ast.Name) and target.value.id == "sys"):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_checks_see_what_they_look_for():
    # the two AST readers, on code that breaks every rule (so a reader that finds nothing fails)
    tree = ast.parse("import os\nfrom actors.actor import Actor\ndef f():\n    import learner.step\n"
                     "    from . import sibling\nimport sys\nsys.path.insert(0, 'x')\nsys.path[0:0] = ['y']\n"
                     "sys.path += ['z']\n")
    assert imported_packages(tree) == {"os", "actors", "learner", "sys"}
    assert edits_sys_path(tree) == [7, 8, 9]


@pytest.mark.parametrize("folder", CODE)
def test_no_import_crosses_the_layers(folder):
    bad = []
    for f, path in _modules():
        if f == folder:
            hit = imported_packages(ast.parse(path.read_text(), str(path))) & FORBIDDEN[folder]
            bad += [f"{path.relative_to(ROOT)} imports {p}" for p in sorted(hit)]
    assert not bad, "\n".join(bad)


def test_no_code_folder_edits_sys_path():
    bad = [f"{path.relative_to(ROOT)}:{ln}" for _, path in _modules()
           for ln in edits_sys_path(ast.parse(path.read_text(), str(path)))]
    assert not bad, "sys.path edited at " + ", ".join(bad)


def test_no_module_is_over_700_lines():
    long = {str(path.relative_to(ROOT)): n for _, path in _modules()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
