"""Prompt source of an actor: one shard of a dataset, read in order, with a resumable cursor.

Contract
--------
- Input: a JSONL file (one JSON object a line) or a parquet file (needs ``pyarrow``; without
  it only JSONL is supported and opening a parquet file raises ``ImportError``). Each row
  holds a prompt (``prompt_key``: a string, a chat message list ``[{"role", "content"}]``, or
  a list of token ids) and a reference answer (``answer_key``; by default the first of
  ``reference``/``answer``/``ground_truth``/``solution`` present). The prompt id is the row's
  ``id_key`` value when present, else ``"<file stem>:<row index>"``.
- Sharding: row ``i`` (0-based, over the whole file) belongs to shard ``i % num_shards``.
- Cursor: the number of this shard's rows already handed out *and committed*. Iterating
  (``next_batch`` / ``__iter__``) hands rows out from ``position``; ``commit(n)`` marks the
  first ``n`` rows of the shard as done and ``save()`` writes ``{"cursor": n, ...}`` to
  ``cursor_file`` atomically (temporary file + fsync + rename). A new ``PromptSource`` with the
  same ``cursor_file`` (same file, shard and shard count) starts at the saved cursor; a cursor
  file written for another shard layout is an error. With ``loop=True`` the shard is read
  again from its start after its end (the cursor keeps counting; the epoch is cursor // size).
- Reference kinds (per-row verifier dispatch): a row in the layout of PRIME's Eurus-2-RL-Data
  and of verl (``prompt`` a chat message list, ``reward_model: {"ground_truth", "style"}``,
  ``data_source``, ``ability``) has its reference read from ``reward_model.ground_truth``
  (unless ``answer_key`` is given). A row that declares its kind -- ``ability`` (``math``;
  ``code``/``coding``), else a ``data_source`` listed in ``DATA_SOURCE_KINDS`` -- yields a
  ``Reference(kind, value)``; any other row yields its bare reference, as before, and the
  caller applies its default kind: ``split_reference(ref, default_kind) -> (kind, value)``
  accepts both. An ``ability`` outside ``ABILITY_KINDS`` is an error when the source is
  opened (never a silent fallback to another verifier). Values: math -> the answer as text
  (numbers become text); code -> a tests dict ``verify_code`` accepts (``code_tests``):
  Eurus/APPS/TACO JSON ``{"inputs", "outputs"[, "fn_name"]}`` (stdin/stdout or call-based)
  and HumanEval-style ``{"prefix", "test", "entry_point"}`` pass through (after JSON
  parsing); assert-style tests (a list of ``assert ...`` strings, or one string of them,
  possibly under ``"asserts"``/``"test_list"``) become the HumanEval form, with the entry
  point taken from the first assert's call. Any other code ground truth is passed on as it
  is, with a warning, and ``verify_code`` reports it as ``sandbox_error`` (malformed tests).
- Tokenisation: ``to_token_ids(prompt, tokenizer)``: a token-id list passes through unchanged
  (the tokenizer-free mode used by tests); with a tokenizer that has a chat template, a
  string becomes one user message and messages go through ``apply_chat_template(...,
  add_generation_prompt=True)``; without a chat template the raw text (messages: their
  contents joined by newlines) is encoded.

Not covered: shuffling (the file's order is the order), filtering by length (the actor skips
prompts longer than ``generation.max_prompt_tokens``), remote storage, verifiers other than
math and code (e.g. verl's ``ability: logic`` rows are refused), streaming a file larger
than memory (the whole file is read when the source opens).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PromptItem", "PromptSource", "Reference", "split_reference", "code_tests", "row_kind",
           "to_token_ids", "write_jsonl", "PARQUET_AVAILABLE", "ABILITY_KINDS", "DATA_SOURCE_KINDS"]

log = logging.getLogger(__name__)

try:  # optional dependency: parquet needs pyarrow
    import pyarrow.parquet as _pq  # type: ignore

    PARQUET_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    _pq = None
    PARQUET_AVAILABLE = False

ANSWER_KEYS = ("reference", "answer", "ground_truth", "solution")

# (prompt_id, prompt: str | list[dict] | list[int], reference: Any | Reference)
PromptItem = tuple[str, Any, Any]

# a row's ``ability`` -> verifier-pool kind
ABILITY_KINDS = {"math": "math", "code": "code", "coding": "code"}
# a row's ``data_source`` -> kind, for rows without ``ability`` (exact names, then prefixes)
DATA_SOURCE_KINDS = {
    "openai/gsm8k": "math", "lighteval/MATH": "math", "DigitalLearningGmbH/MATH-lighteval": "math",
    "math_dapo": "math", "numina_": "math",  # Eurus-2-RL-Data: numina_cn_k12, numina_olympiads, ...
    "codecontests": "code", "apps": "code", "codeforces": "code", "taco": "code",
}


@dataclass(frozen=True)
class Reference:
    """A row's reference with the verifier kind its row declared (see the module docstring)."""

    kind: str  # a verifier-pool kind: "math" | "code"
    value: Any  # math: the answer text; code: a tests dict ``verify_code`` accepts


def split_reference(ref: Any, default_kind: str = "math") -> tuple[str, Any]:
    """``(kind, value)`` of an item's reference: a ``Reference`` gives its own kind, a bare
    reference gets ``default_kind``."""
    if isinstance(ref, Reference):
        return ref.kind, ref.value
    return default_kind, ref


def row_kind(row: dict, kind_key: str = "ability") -> str | None:
    """The verifier kind a row declares (``ability``, else a known ``data_source``), or None.
    Raises ValueError for an ``ability`` no verifier handles."""
    ability = row.get(kind_key)
    if ability is not None:
        kind = ABILITY_KINDS.get(str(ability).strip().lower())
        if kind is None:
            raise ValueError(f"{kind_key}={ability!r} has no verifier (known: {sorted(ABILITY_KINDS)})")
        return kind
    source = row.get("data_source")
    if isinstance(source, str):
        if source in DATA_SOURCE_KINDS:
            return DATA_SOURCE_KINDS[source]
        for prefix, kind in DATA_SOURCE_KINDS.items():
            if prefix.endswith("_") and source.startswith(prefix):
                return kind
    return None


_CALL_RE = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\s*\(")


def _entry_point(asserts: Sequence[str]) -> str | None:
    """The function the asserts test: the first called name that is not a builtin."""
    import builtins
    import keyword

    for line in asserts:
        for m in _CALL_RE.finditer(line):
            name = m.group(1)
            if not keyword.iskeyword(name) and not hasattr(builtins, name):
                return name
    return None


def _asserts_to_humaneval(asserts: Sequence[str], setup: str = "") -> dict | None:
    """Assert strings -> ``{"prefix", "test", "entry_point"}``: ``check`` runs the asserts
    (which call the function by its own name, a module global of the program)."""
    lines = [str(a).strip() for a in asserts if str(a).strip()]
    if not lines:
        return None
    entry = _entry_point(lines)
    if entry is None or not all(ln.startswith("assert") for ln in lines):
        return None
    body = "\n".join("    " + ln for a in lines for ln in a.splitlines())
    test = (setup.rstrip() + "\n\n" if setup.strip() else "") + "def check(candidate):\n" + body + "\n"
    return {"prefix": "", "test": test, "entry_point": entry}


def code_tests(ground_truth: Any) -> dict:
    """A code row's ground truth -> a tests dict ``verify_code`` accepts (see the module
    docstring for the forms). Raises ValueError for a form it does not know."""
    gt = ground_truth
    if isinstance(gt, (bytes, bytearray)):
        gt = gt.decode("utf-8")
    if isinstance(gt, str):
        text = gt.strip()
        try:
            gt = json.loads(text)
        except ValueError:
            if text.startswith("assert"):
                conv = _asserts_to_humaneval(text.splitlines())
                if conv is not None:
                    return conv
            raise ValueError("code ground truth is neither JSON nor assert statements") from None
    if isinstance(gt, dict):
        if gt.get("entry_point") and "test" in gt:
            return gt
        if isinstance(gt.get("inputs"), list) and isinstance(gt.get("outputs"), list):
            out = {"inputs": gt["inputs"], "outputs": gt["outputs"]}
            if gt.get("fn_name"):
                out["fn_name"] = str(gt["fn_name"])
            return out
        for key in ("asserts", "test_list", "tests"):
            if isinstance(gt.get(key), list):
                conv = _asserts_to_humaneval(gt[key], str(gt.get("test_setup_code") or gt.get("setup") or ""))
                if conv is not None:
                    return conv
        raise ValueError(f"code ground truth dict with keys {sorted(gt)[:8]} is not a known test form")
    if isinstance(gt, list) and gt and all(isinstance(a, str) for a in gt):
        conv = _asserts_to_humaneval(gt)
        if conv is not None:
            return conv
    raise ValueError(f"code ground truth of type {type(gt).__name__} is not a known test form")


def _reference_value(kind: str, ref: Any) -> Any:
    if kind == "code":
        try:
            return code_tests(ref)
        except ValueError as e:
            log.warning("code ground truth passed on unconverted (the verifier will flag it): %s", e)
            return ref
    if kind == "math" and isinstance(ref, (int, float)) and not isinstance(ref, bool):
        return str(int(ref)) if float(ref).is_integer() else repr(ref)
    return ref


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        if _pq is None:
            raise ImportError(f"reading {path} needs pyarrow, which is not installed (JSONL works without it)")
        return _pq.read_table(path).to_pylist()
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: a row must be a JSON object")
            rows.append(row)
    return rows


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write rows as JSONL (helper for tests and data preparation)."""
    _atomic_write(Path(path), "".join(json.dumps(r) + "\n" for r in rows))


PROMPT_KEYS = ("prompt", "problem", "question")  # where a row's prompt may be, in order of preference


class PromptSource:
    """See the module docstring."""

    def __init__(self, path: str | os.PathLike, shard: int = 0, num_shards: int = 1,
                 cursor_file: str | os.PathLike | None = None, *, prompt_key: str = "prompt",
                 answer_key: str | None = None, id_key: str = "id", loop: bool = False,
                 kind_key: str = "ability"):
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in 0..{num_shards - 1}, got {shard}")
        self.path = Path(path)
        self.shard, self.num_shards = int(shard), int(num_shards)
        self.cursor_file = Path(cursor_file) if cursor_file is not None else None
        self.prompt_key, self.answer_key, self.id_key = prompt_key, answer_key, id_key
        self.loop = loop
        self.kind_key = kind_key
        rows = _read_rows(self.path)
        self._rows = rows[self.shard::self.num_shards]
        self._kinds = []  # per shard row: the kind it declares, or None (checked here, at open)
        for i, row in enumerate(self._rows):
            try:
                self._kinds.append(row_kind(row, kind_key))
            except ValueError as e:
                raise ValueError(f"row {self._first_index_of(i)} of {self.path}: {e}") from None
        self._first_index = self.shard  # row i of the shard is row shard + i * num_shards
        self.committed = self._load_cursor()
        self.position = self.committed  # next row to hand out

    def columns(self) -> list[str]:
        """The fields of the shard's first row (empty for an empty shard)."""
        return list(self._rows[0]) if self._rows else []

    def _first_index_of(self, i: int) -> int:
        """Row index in the file of the shard's row ``i``."""
        return self.shard + i * self.num_shards

    # ---------------------------------------------------------------- cursor
    def _load_cursor(self) -> int:
        if self.cursor_file is None or not self.cursor_file.exists():
            return 0
        state = json.loads(self.cursor_file.read_text(encoding="utf-8"))
        if (state.get("shard"), state.get("num_shards")) != (self.shard, self.num_shards):
            raise ValueError(f"cursor file {self.cursor_file} is for shard {state.get('shard')}/"
                             f"{state.get('num_shards')}, not {self.shard}/{self.num_shards}")
        return int(state["cursor"])

    def commit(self, cursor: int) -> None:
        """Mark the shard's first ``cursor`` rows as done (never moves backwards)."""
        if cursor > self.position:
            raise ValueError(f"commit({cursor}) beyond the rows handed out ({self.position})")
        self.committed = max(self.committed, int(cursor))

    def rewind(self) -> None:
        """Hand rows out again from the committed cursor (uncommitted ones are re-read)."""
        self.position = self.committed

    def save(self) -> None:
        """Persist the committed cursor (atomic); no-op without a cursor file."""
        if self.cursor_file is None:
            return
        _atomic_write(self.cursor_file, json.dumps({
            "cursor": self.committed, "path": str(self.path), "shard": self.shard,
            "num_shards": self.num_shards, "size": len(self._rows),
        }))

    # ---------------------------------------------------------------- rows
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def exhausted(self) -> bool:
        return not self._rows or (not self.loop and self.position >= len(self._rows))

    def item(self, cursor: int) -> PromptItem:
        """The item at shard position ``cursor`` (modulo the shard size when looping)."""
        i = cursor % len(self._rows) if self.loop else cursor
        row = self._rows[i]
        if self.prompt_key not in row:
            raise KeyError(f"row {self._first_index + i * self.num_shards} of {self.path} has no {self.prompt_key!r}")
        prompt = row[self.prompt_key]
        if self.answer_key is not None:
            ref = row.get(self.answer_key)
        elif isinstance(row.get("reward_model"), dict) and "ground_truth" in row["reward_model"]:
            ref = row["reward_model"]["ground_truth"]  # Eurus-2-RL-Data / verl layout
        else:
            ref = next((row[k] for k in ANSWER_KEYS if k in row), None)
        kind = self._kinds[i]
        if kind is not None:
            ref = Reference(kind, _reference_value(kind, ref))
        pid = row.get(self.id_key)
        if pid is None:
            pid = f"{self.path.stem}:{self._first_index + i * self.num_shards}"
        if self.loop and cursor >= len(self._rows):
            pid = f"{pid}@{cursor // len(self._rows)}"
        return str(pid), prompt, ref

    def next_batch(self, n: int) -> list[tuple[int, PromptItem]]:
        """Up to ``n`` items as ``(cursor_after, item)``: ``commit(cursor_after)`` marks the
        item (and all before it) done. Empty once the shard is exhausted."""
        out = []
        while len(out) < n and not self.exhausted:
            it = self.item(self.position)
            self.position += 1
            out.append((self.position, it))
        return out

    def __iter__(self) -> Iterator[PromptItem]:
        """Items from ``position`` on; each one handed out is committed (simple readers)."""
        while not self.exhausted:
            ((after, it),) = self.next_batch(1)
            self.commit(after)
            yield it


def to_token_ids(prompt: Any, tokenizer=None) -> list[int]:
    """Prompt (token ids, text, or chat messages) -> token ids (see the module docstring)."""
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]  # already token ids (tokenizer-free mode)
    if tokenizer is None:
        raise ValueError("a text or chat prompt needs a tokenizer")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        text = prompt
    elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
        text = "\n".join(str(m.get("content", "")) for m in messages)
    else:
        raise TypeError(f"unsupported prompt type {type(prompt).__name__}")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in some versions
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=True)]
