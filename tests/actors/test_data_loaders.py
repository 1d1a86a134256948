"""Training-data loaders (actors/prompts.py): the parquet layout of PRIME's Eurus-2-RL-Data
and verl (``prompt`` chat messages, ``reward_model.ground_truth``, ``data_source``,
``ability``) with per-row verifier dispatch through ``Reference`` / ``split_reference``.

Checked: a small parquet in that layout, built here, yields chat prompts and references of
the declared kind for math and code rows (stdin/stdout, call-based and assert-style tests),
and the verifiers score a correct and a wrong answer correctly for each row; rows without a
declared kind keep a bare reference (the actor's default kind applies); an unknown
``ability`` is refused when the source opens; sharding keeps each row's kind; unknown code
test forms reach the verifier as ``sandbox_error``, not a reward.
"""

from __future__ import annotations

import json

import pytest

from actors.prompts import (
    PromptSource,
    Reference,
    code_tests,
    row_kind,
    split_reference,
    write_jsonl,
)
from actors.verifiers import verify_code, verify_math

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SYSTEM = "When tackling complex reasoning tasks, you have access to the following actions."
MATH_SUFFIX = "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"
CODE_SUFFIX = "\n\nWrite Python code to solve the problem. Present the code in \n```python\nYour code\n```\nat the end."

ADD_STDIN_OK = "Read two numbers and add them.\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
ADD_STDIN_BAD = "```python\na, b = map(int, input().split())\nprint(a - b)\n```"
ADD_FN_OK = "```python\ndef add(a, b):\n    return a + b\n```"
ADD_FN_BAD = "```python\ndef add(a, b):\n    return a * b\n```"

# (data_source, ability, ground truth, question, correct response, wrong response, kind)
ROWS = [
    ("numina_olympiads", "math", "\\frac{1}{2}", "Half of one?", "It is $\\boxed{0.5}$.", "\\boxed{2}", "math"),
    ("codecontests", "code", json.dumps({"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}),
     "Add two numbers from stdin.", ADD_STDIN_OK, ADD_STDIN_BAD, "code"),
    ("apps", "code", json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]}),
     "Write add(a, b).", ADD_FN_OK, ADD_FN_BAD, "code"),
    ("leetcode", "code", json.dumps(["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
     "Write add(a, b).", ADD_FN_OK, ADD_FN_BAD, "code"),
    ("openai/gsm8k", "math", "72", "How many?", "The answer is 72.", "The answer is 71.", "math"),
    ("numina_cn_k12", None, "5", "Count.", "\\boxed{5}", "\\boxed{6}", "math"),  # kind from data_source
]


def eurus_table(rows=ROWS):
    """A pyarrow table with Eurus-2-RL-Data's columns and nested types."""
    records = []
    for i, (source, ability, gt, question, *_rest) in enumerate(rows):
        suffix = CODE_SUFFIX if (ability or "math") == "code" else MATH_SUFFIX
        records.append({
            "data_source": source,
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question + suffix}],
            "ability": ability,
            "reward_model": {"ground_truth": gt, "style": "rule"},
            "extra_info": {"split": "train", "index": i},
        })
    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())])),
    ])
    return pa.Table.from_pylist(records, schema=schema)


@pytest.fixture
def eurus_parquet(tmp_path):
    path = tmp_path / "eurus-2-rl-data.parquet"
    pq.write_table(eurus_table(), path)
    return path


def judge(kind, response, value):
    return (verify_math if kind == "math" else verify_code)(response, value, timeout_s=10.0)


def test_eurus_parquet_prompts_and_verifiable_references(eurus_parquet):
    src = PromptSource(eurus_parquet)
    items = list(src)
    assert len(items) == len(ROWS)
    for (pid, prompt, ref), (source, ability, gt, question, good, bad, kind) in zip(items, ROWS):
        assert pid.startswith("eurus-2-rl-data:")
        assert [m["role"] for m in prompt] == ["system", "user"] and prompt[1]["content"].startswith(question)
        assert isinstance(ref, Reference) and ref.kind == kind
        got_kind, value = split_reference(ref, default_kind="math")
        assert got_kind == kind
        json.dumps(value)  # travels to the verifier pool as JSON
        ok, no = judge(kind, good, value), judge(kind, bad, value)
        assert (ok.status, ok.reward) == (("correct", 1.0) if kind == "math" else ("passed", 1.0)), (source, ok)
        assert no.status in ("wrong", "failed") and no.reward == 0.0, (source, no)


def test_code_ground_truths_become_verify_code_tests(eurus_parquet):
    refs = [ref for _, _, ref in PromptSource(eurus_parquet)]
    assert refs[1].value == {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}
    assert refs[2].value == {"inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]], "fn_name": "add"}
    asserts = refs[3].value
    assert asserts["entry_point"] == "add" and asserts["prefix"] == ""
    assert asserts["test"] == "def check(candidate):\n    assert add(1, 2) == 3\n    assert add(-1, 1) == 0\n"
    assert refs[0].value == "\\frac{1}{2}" and refs[4].value == "72"


def test_sharding_keeps_each_rows_kind(eurus_parquet):
    kinds = [[split_reference(ref)[0] for _, _, ref in PromptSource(eurus_parquet, shard=s, num_shards=2)]
             for s in (0, 1)]
    assert kinds == [[r[6] for r in ROWS[0::2]], [r[6] for r in ROWS[1::2]]]


def test_rows_without_a_kind_keep_a_bare_reference(tmp_path):
    path = tmp_path / "plain.jsonl"
    write_jsonl(path, [{"prompt": "1+1?", "answer": "2"},
                       {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "7"},
                        "data_source": "my_set"}])
    (_, p0, r0), (_, p1, r1) = list(PromptSource(path))
    assert (p0, r0) == ("1+1?", "2") and r1 == "7"  # ground truth read, no kind declared
    assert split_reference(r0) == ("math", "2")
    assert split_reference(r1, default_kind="parity") == ("parity", "7")
    assert split_reference(Reference("code", {"x": 1}), "math") == ("code", {"x": 1})


def test_numbers_become_text_and_answer_key_wins(tmp_path):
    path = tmp_path / "n.jsonl"
    write_jsonl(path, [{"prompt": "q", "ability": "math", "reward_model": {"ground_truth": 27.0}, "alt": "x"}])
    (_, _, ref), = list(PromptSource(path))
    assert ref == Reference("math", "27")
    (_, _, ref), = list(PromptSource(path, answer_key="alt"))
    assert ref == Reference("math", "x")


def test_unknown_ability_is_refused_at_open(tmp_path):
    rows = list(ROWS) + [("logic_puzzles", "logic", "A", "Who?", "", "", "?")]
    path = tmp_path / "mixed.parquet"
    pq.write_table(eurus_table(rows), path)
    with pytest.raises(ValueError, match=r"row 6 of .*ability='logic' has no verifier"):
        PromptSource(path)


def test_row_kind_rules():
    assert row_kind({"ability": "Coding"}) == "code"
    assert row_kind({"ability": "math", "data_source": "taco"}) == "math"  # ability wins
    assert row_kind({"data_source": "taco"}) == "code"
    assert row_kind({"data_source": "numina_amc_aime"}) == "math"
    assert row_kind({"data_source": "mystery"}) is None and row_kind({}) is None
    assert row_kind({"task": "code"}, kind_key="task") == "code"


def test_code_tests_forms():
    io = {"inputs": ["1\n"], "outputs": ["1\n"]}
    assert code_tests(json.dumps(io)) == io
    assert code_tests({**io, "fn_name": ""}) == io  # empty fn_name = stdin/stdout
    he = {"prefix": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 1\n", "entry_point": "f"}
    assert code_tests(json.dumps(he)) == he
    plain = code_tests("assert abs(solve(3) - 1.5) < 1e-9\nassert solve(0) == 0")
    assert plain["entry_point"] == "solve"  # builtins skipped
    assert code_tests({"test_list": ["assert f(1) == 2"], "test_setup_code": "import math"})["test"].startswith(
        "import math\n\ndef check(candidate):\n")
    for bad in ['{"foo": 1}', "print(1)", [1, 2], 42, '["x = 1"]']:
        with pytest.raises(ValueError):
            code_tests(bad)


def test_unknown_code_form_reaches_the_verifier_as_an_error(tmp_path):
    path = tmp_path / "odd.jsonl"
    write_jsonl(path, [{"prompt": "q", "ability": "code", "reward_model": {"ground_truth": '{"foo": 1}'}}])
    (_, _, ref), = list(PromptSource(path))
    kind, value = split_reference(ref)
    assert kind == "code" and value == '{"foo": 1}'
    v = verify_code(ADD_FN_OK, value)
    assert v.status == "sandbox_error" and not v.ok and v.reward == 0.0
