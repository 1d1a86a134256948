"""The embedded default task: seeded multi-step arithmetic with worked solutions.

Contract
--------
- Callers: the warm-up (``actors.tasks.warmup``: SFT demonstrations, its dev evaluation),
  the launcher (``write_prompt_files``: RL prompts and the held-out set), tests.
- A problem is a start value and ``steps`` operations applied LEFT TO RIGHT (no operator
  precedence): prompt ``"1 7 + 2 5 - 8 * 3"`` (every number written digit by digit, tokens
  separated by spaces). Its worked solution writes one step per operation and boxes the
  result: ``"1 7 + 2 5 = 4 2 ; 4 2 - 8 = 3 4 ; 3 4 * 2 = 6 8 ; \\boxed{ 6 8 }"``.
  Bounds (difficulty = ``steps`` and ``digits``): every value, intermediate ones included,
  lies in ``0 .. 10**digits - 1``; an add/sub operand is ``1 .. 10**digits - 1``; a mul
  operand is ``2 .. 9``. The operation of a step is drawn uniformly from those that keep the
  value in range (mul needs a value >= 1).
- Determinism: ``make_splits(seed, ...)`` is a pure function of its arguments (Python's
  ``random.Random``); problems are drawn in one stream of UNIQUE canonical keys
  (``Problem.key``) and dealt in the order heldout, dev, train, sft, so the four splits are
  disjoint by construction and the held-out set does not change when a later split's size
  does.
- Demonstrations (``demonstrations``): exactly ``round(slip_share * n)`` of them carry a
  *slip*: the written result of ONE step is off by ``1..max_slip`` (either sign) and every
  later step continues consistently from the wrong value, so the boxed answer is wrong
  (a mul operand is never 0 or 1, so a slip always reaches the answer). A slip is only placed
  where the wrong chain stays in range. The slipped step is uniform over the steps that can
  take one.
- Scoring is the project's math verifier on the DECODED response text
  (``verify_math("... \\boxed{ 6 8 }", "68")`` is ``correct``: its canonical form drops spaces).
  ``diagnose`` classifies a response by its steps (correct / slip / other error) for reports.
- Tokenizer (``build_tokenizer``): word level, 22 tokens (``<pad> <bos> <eos> <sep> <unk>``,
  digits, ``+ - * = ;``, ``\\boxed{`` and ``}``), whitespace pre-tokenisation, chat template
  ``"<bos> {user content} <sep>"``; decoding joins tokens with single spaces.
- Prompt files (``write_prompt_files``): JSONL rows ``{"id", "prompt", "answer", "ability":
  "math"}`` that ``actors.prompts.PromptSource`` reads; the prompt is the bare problem text
  (the chat template adds ``<bos>``/``<sep>``).

Not covered: negative numbers, division, operator precedence, and any natural-language
phrasing; the training itself (``actors.tasks.warmup``).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "OPS", "SPECIAL_TOKENS", "VOCAB", "CHAT_TEMPLATE", "Problem", "Slip", "Demo",
    "generate_problem", "make_splits", "splits_from_config", "render_solution", "demonstrations",
    "prompt_rows", "write_prompt_files", "build_tokenizer", "number_words", "diagnose",
]

OPS = ("+", "-", "*")
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>",
                  "sep_token": "<sep>", "unk_token": "<unk>"}
VOCAB = (["<pad>", "<bos>", "<eos>", "<sep>", "<unk>"] + [str(d) for d in range(10)]
         + ["+", "-", "*", "=", ";", "\\boxed{", "}"])
# "<bos> 1 7 + 2 5 <sep>"; a system message (if any) is written like a user one
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %} {{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} {{ sep_token }}{% endif %}"
)
SPLITS = ("heldout", "dev", "train", "sft")


def number_words(v: int, width: int = 0) -> str:
    """``42`` -> ``"4 2"`` (one token per digit); zero-padded to ``width`` digits:
    ``number_words(7, 2) == "0 7"``."""
    return " ".join(str(int(v)).zfill(width))


def _apply(v: int, op: str, x: int) -> int:
    return v + x if op == "+" else v - x if op == "-" else v * x


def _in_range(v: int, max_value: int) -> bool:
    return 0 <= v <= max_value


@dataclass(frozen=True)
class Problem:
    """``start`` then ``ops`` (``(op, operand)`` pairs) applied left to right."""

    start: int
    ops: tuple[tuple[str, int], ...]
    width: int = 0  # numbers in the prompt and the steps are zero-padded to this many digits


    @property
    def key(self) -> str:
        """Canonical key: two problems are the same problem iff their keys are equal."""
        return str(self.start) + "".join(f"{op}{x}" for op, x in self.ops)

    @property
    def prompt(self) -> str:
        w = self.width
        return " ".join([number_words(self.start, w)] + [f"{op} {number_words(x, w)}" for op, x in self.ops])

    def values(self, slip: Slip | None = None) -> list[int]:
        """The written value after each step (``len(ops)`` values), with ``slip`` applied."""
        out, v = [], self.start
        for i, (op, x) in enumerate(self.ops):
            v = _apply(v, op, x)
            if slip is not None and i == slip.step:
                v += slip.delta
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]


@dataclass(frozen=True)
class Slip:
    step: int  # 0-based index of the step whose written result is off
    delta: int  # written result - true result of that step (nonzero)


@dataclass(frozen=True)
class Demo:
    problem: Problem
    response: str
    slip: Slip | None


def generate_problem(rng: random.Random, steps: int, digits: int, fixed_width: bool = False) -> Problem:
    """One problem (see the module docstring for the bounds)."""
    if steps < 1 or digits < 1:
        raise ValueError(f"steps and digits must be >= 1 (got {steps}, {digits})")
    max_value = 10 ** digits - 1
    start = v = rng.randint(0, max_value)
    ops = []
    for _ in range(steps):
        feasible = []
        if v < max_value:
            feasible.append("+")
        if v > 0:
            feasible.append("-")
        if 1 <= v <= max_value // 2:
            feasible.append("*")
        op = rng.choice(feasible)
        if op == "+":
            x = rng.randint(1, max_value - v)
        elif op == "-":
            x = rng.randint(1, v)
        else:
            x = rng.randint(2, min(9, max_value // v))
        ops.append((op, x))
        v = _apply(v, op, x)
    return Problem(start, tuple(ops), digits if fixed_width else 0)


def make_splits(seed: int, steps: int, digits: int, sizes: dict[str, int],
                fixed_width: bool = False) -> dict[str, list[Problem]]:
    """Disjoint splits ``{"heldout", "dev", "train", "sft"}`` of unique problems (any of the
    four may be absent from ``sizes`` = empty). Raises if the problem space is too small."""
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; known: {SPLITS}")
    rng = random.Random(f"arithmetic:{seed}:{steps}:{digits}")
    seen: set[str] = set()
    out: dict[str, list[Problem]] = {}
    total = sum(sizes.values())
    misses = 0
    for name in SPLITS:
        n = int(sizes.get(name, 0))
        problems: list[Problem] = []
        while len(problems) < n:
            p = generate_problem(rng, steps, digits, fixed_width)
            if p.key in seen:
                misses += 1
                if misses > 10 * total + 1000:
                    raise ValueError(f"cannot draw {total} distinct problems with steps={steps}, digits={digits}")
                continue
            seen.add(p.key)
            problems.append(p)
        out[name] = problems
    return out


def splits_from_config(task: Any) -> dict[str, list[Problem]]:
    """``make_splits`` with the sizes of a ``task`` config section (``common.config.TaskConfig``)."""
    if task.kind != "arithmetic":
        raise ValueError(f"task.kind={task.kind!r} is not 'arithmetic'")
    return make_splits(task.seed, task.steps, task.digits, {
        "heldout": task.heldout_size, "dev": task.dev_size, "train": task.train_size, "sft": task.sft_size},
        fixed_width=task.fixed_width)


def render_solution(problem: Problem, slip: Slip | None = None) -> str:
    """The worked solution text (with ``slip`` applied, if any)."""
    parts, prev, w = [], problem.start, problem.width
    for (op, x), v in zip(problem.ops, problem.values(slip)):
        parts.append(f"{number_words(prev, w)} {op} {number_words(x, w)} = {number_words(v, w)}")
        prev = v
    return " ; ".join(parts) + f" ; \\boxed{{ {number_words(prev)} }}"


def _feasible_slips(problem: Problem, max_slip: int, max_value: int) -> dict[int, list[int]]:
    """``{step: [deltas]}`` whose wrong chain stays within ``0..max_value``."""
    true = problem.values()
    out: dict[int, list[int]] = {}
    for s in range(len(problem.ops)):
        deltas = []
        for d in [d for k in range(1, max_slip + 1) for d in (-k, k)]:
            w = true[s] + d
            ok = _in_range(w, max_value)
            for op, x in problem.ops[s + 1:]:
                if not ok:
                    break
                w = _apply(w, op, x)
                ok = _in_range(w, max_value)
            if ok:
                deltas.append(d)
        if deltas:
            out[s] = deltas
    return out


def demonstrations(problems: Sequence[Problem], slip_share: float, max_slip: int, digits: int,
                   seed: int) -> list[Demo]:
    """One worked solution per problem, in order; exactly ``round(slip_share * n)`` carry one
    slip (problems with no feasible slip are skipped for it). Deterministic in ``seed``."""
    if not 0.0 <= slip_share <= 1.0:
        raise ValueError(f"slip_share must be in [0, 1] (got {slip_share})")
    rng = random.Random(f"slips:{seed}")
    max_value = 10 ** digits - 1
    want = round(slip_share * len(problems))
    order = list(range(len(problems)))
    rng.shuffle(order)
    slips: dict[int, Slip] = {}
    for i in order:
        if len(slips) >= want:
            break
        feasible = _feasible_slips(problems[i], max_slip, max_value)
        if not feasible:
            continue
        step = rng.choice(sorted(feasible))
        slips[i] = Slip(step, rng.choice(feasible[step]))
    if len(slips) < want:
        raise ValueError(f"only {len(slips)} of {len(problems)} problems can take a slip (wanted {want})")
    return [Demo(p, render_solution(p, slips.get(i)), slips.get(i)) for i, p in enumerate(problems)]


def prompt_rows(problems: Sequence[Problem], split: str) -> list[dict]:
    """``PromptSource`` rows for ``problems``."""
    return [{"id": f"arith-{split}-{i:06d}", "prompt": p.prompt, "answer": str(p.answer), "ability": "math"}
            for i, p in enumerate(problems)]


def write_prompt_files(out_dir: str | os.PathLike, splits: dict[str, list[Problem]],
                       names: Sequence[str] = ("train", "heldout")) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.jsonl`` for each split in ``names``; returns the paths."""
    from actors.prompts import write_jsonl

    out_dir = Path(out_dir)
    paths = {}
    for name in names:
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], prompt_rows(splits[name], name))
    return paths


def build_tokenizer(save_dir: str | os.PathLike | None = None):
    """The task's word-level ``PreTrainedTokenizerFast`` (saved with ``save_pretrained`` when
    ``save_dir`` is given)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   model_max_length=1024, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


_NUM = r"((?:\d )*\d)"
_STEP_RE = re.compile(rf"{_NUM} ([+\-*]) {_NUM} = {_NUM}")
_BOX_RE = re.compile(rf"\\boxed\{{ {_NUM} \}}")


def _read_number(words: str, width: int = 0) -> int | None:
    """Digits -> value; None unless written as ``number_words(value, width)`` writes it."""
    parts = words.split(" ")
    if not all(len(w) == 1 and w.isdigit() for w in parts):
        return None
    v = int("".join(parts))
    return v if words == number_words(v, width) else None


def diagnose(problem: Problem, text: str, max_slip: int = 3) -> str:
    """Classify a decoded response: ``"correct"`` (boxed answer right), ``"slip"`` (well
    formed, every step copies the previous value and the prompt's operation, and exactly one
    step's result is off by ``1..max_slip`` while every other step is exact), ``"arith"``
    (well formed, other wrong results), ``"copy"`` (a step misquotes the previous value or the
    prompt's operation), ``"format"`` (not of the solution's form)."""
    chunks = [c.strip() for c in text.strip().split(";")]
    if len(chunks) != len(problem.ops) + 1:
        return "format"
    box = _BOX_RE.fullmatch(chunks[-1])
    if box is None:
        return "format"
    boxed = _read_number(box.group(1))
    rows = []
    for c in chunks[:-1]:
        m = _STEP_RE.fullmatch(c)
        if m is None:
            return "format"
        w = problem.width
        a, op, x, r = _read_number(m.group(1), w), m.group(2), _read_number(m.group(3), w), _read_number(m.group(4), w)
        if None in (a, x, r):
            return "format"
        rows.append((a, op, x, r))
    if boxed is None:
        return "format"
    if boxed == problem.answer and rows[-1][3] == boxed:
        return "correct"
    prev = problem.start
    off = []
    for (a, op, x, r), (pop, px) in zip(rows, problem.ops):
        if a != prev or (op, x) != (pop, px):
            return "copy"
        if r != _apply(a, op, x):
            off.append(r - _apply(a, op, x))
        prev = r
    if boxed != prev:
        return "copy"
    if len(off) == 1 and 1 <= abs(off[0]) <= max_slip:
        return "slip"
    return "arith"


def load_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL prompt file (helper for evaluation scripts and tests)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
