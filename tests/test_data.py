"""Tests of grpo.data: GSM8K validation with file:line errors, records, SFT targets, atomic I/O."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest

import grpo.data
from grpo.data import (
    DataError,
    build_messages,
    make_record,
    parse_gold,
    read_gsm8k_jsonl,
    read_jsonl,
    reasoning_text,
    sft_completion,
    sha256_file,
    strip_calculator,
    validate_rows,
    write_json_atomic,
    write_jsonl_atomic,
)
from grpo.errors import UserError
from grpo.rewards import grade, is_well_formed

REPO = Path(__file__).resolve().parents[1]

# Real GSM8K train rows, copied (the tests never read the data folder).
NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}
WENG = {
    "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
    "babysitting. How much did she earn?",
    "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
    "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
}
THOUSANDS = {
    "question": "A store sells 9 boxes of 120 pens each. How many pens does it sell?",
    "answer": "9 * 120 = <<9*120=1080>>1080 pens.\n#### 1,080",
}
GOOD_LINE = json.dumps(NATALIA)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        (NATALIA["answer"], "72"),
        (WENG["answer"], "10"),
        (THOUSANDS["answer"], "1080"),
        ("#### -3", "-3"),
        ("#### 0.50", "0.5"),
        ("first #### 1\nthen #### 2", "2"),
        ("#### 123456789012345678901234567890123", "123456789012345678901234567890123"),
    ],
)
def test_parse_gold(answer: str, gold: str) -> None:
    assert parse_gold(answer) == gold


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        ("The answer is 72", "no '####'"),
        ("#### abc", "gold answer 'abc' is not a number"),
        ("#### eighteen", "is not a number"),
        ("#### 1 or 2", "is not a number"),
        ("####", "gold answer '' is not a number"),
    ],
)
def test_parse_gold_errors(answer: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_gold(answer)


def test_read_gsm8k_jsonl(tmp_path: Path) -> None:
    extra = {**WENG, "source": "extra keys are ignored"}
    path = write_lines(tmp_path / "train.jsonl", [GOOD_LINE, "", "  ", json.dumps(extra)])
    assert read_gsm8k_jsonl(path) == [NATALIA, WENG]
    assert read_gsm8k_jsonl(str(path)) == [NATALIA, WENG]


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ('{"question": "q" "answer": "#### 1"}', "malformed JSON (Expecting ',' delimiter"),
        ("not json", "malformed JSON"),
        ("[1, 2]", "expected an object, got list"),
        ('"a string"', "expected an object, got str"),
        ('{"answer": "#### 1"}', "missing 'question'"),
        ('{"question": "q"}', "missing 'answer'"),
        ('{"question": 7, "answer": "#### 1"}', "'question' must be a string, got int"),
        ('{"question": "q", "answer": null}', "'answer' must be a string, got NoneType"),
        ('{"question": "  ", "answer": "#### 1"}', "'question' is empty"),
        ('{"question": "q", "answer": ""}', "'answer' is empty"),
        ('{"question": "q", "answer": "The answer is 1"}', "no '####'"),
        ('{"question": "q", "answer": "#### abc"}', "gold answer 'abc' is not a number"),
    ],
)
def test_read_gsm8k_jsonl_errors_name_file_and_line(
    tmp_path: Path, bad_line: str, match: str
) -> None:
    path = write_lines(tmp_path / "train.jsonl", [GOOD_LINE, "", bad_line, GOOD_LINE])
    with pytest.raises(DataError) as info:
        read_gsm8k_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert "train.jsonl:3" in message
    assert match in message
    assert "fix or remove the line" in message
    assert "\n" not in message


def test_data_error_is_a_user_error_and_a_value_error() -> None:
    assert issubclass(DataError, UserError)
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_read_gsm8k_jsonl_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"test\.jsonl: no rows"):
        read_gsm8k_jsonl(path)


def test_read_gsm8k_jsonl_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(DataError, match="file not found") as info:
        read_gsm8k_jsonl(path)
    assert str(path) in str(info.value)


def test_read_gsm8k_jsonl_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"question": "\xff", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:1: not UTF-8"):
        read_gsm8k_jsonl(path)


def test_validate_rows() -> None:
    assert validate_rows([NATALIA, {**WENG, "extra": 1}], "openai/gsm8k[main]/train") == [
        NATALIA,
        WENG,
    ]


@pytest.mark.parametrize(
    ("bad_row", "match"),
    [
        ({"question": "q"}, "missing 'answer'"),
        ({"question": "q", "answer": 5}, "'answer' must be a string, got int"),
        ({"question": "q", "answer": "#### x"}, "gold answer 'x' is not a number"),
        ("a string", "expected an object, got str"),
    ],
)
def test_validate_rows_errors_name_source_and_row(bad_row: object, match: str) -> None:
    with pytest.raises(DataError) as info:
        validate_rows([NATALIA, WENG, bad_row], "openai/gsm8k[main]/train")
    message = str(info.value)
    assert message.startswith("openai/gsm8k[main]/train: row 2: ")
    assert match in message


def test_validate_rows_empty() -> None:
    with pytest.raises(DataError, match="openai/gsm8k\\[main\\]/test: no rows"):
        validate_rows([], "openai/gsm8k[main]/test")


def test_make_record() -> None:
    row = {**NATALIA, "question": "  " + NATALIA["question"] + "\n"}
    assert make_record("train", 7, row) == {
        "id": "train-00007",
        "question": NATALIA["question"],
        "solution": NATALIA["answer"],
        "gold": "72",
    }
    assert make_record("test", 12345, THOUSANDS)["id"] == "test-12345"
    assert make_record("test", 0, THOUSANDS)["gold"] == "1080"


def test_strip_calculator_and_reasoning_text() -> None:
    assert strip_calculator(WENG["answer"]) == (
        "Weng earns 12/60 = $0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $10.\n#### 10"
    )
    assert reasoning_text(WENG["answer"]) == (
        "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10."
    )
    assert strip_calculator("no annotations") == "no annotations"
    assert reasoning_text("  just text  ") == "just text"


@pytest.mark.parametrize("row", [NATALIA, WENG, THOUSANDS])
def test_sft_completion_is_well_formed_and_correct(row: dict[str, str]) -> None:
    record = make_record("train", 0, row)
    target = sft_completion(record["solution"], record["gold"])
    assert "<<" not in target
    assert "####" not in target
    assert is_well_formed(target)
    assert is_well_formed(target + "<|im_end|>")
    assert grade(target, record["gold"]).strict_correct


def test_sft_completion_text() -> None:
    assert sft_completion(NATALIA["answer"], "72") == (
        "<reasoning>\n"
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "</reasoning>\n"
        "<answer>\n72\n</answer>"
    )


def test_build_messages() -> None:
    assert build_messages("How many?", "Respond in the format") == [
        {"role": "system", "content": "Respond in the format"},
        {"role": "user", "content": "How many?"},
    ]
    assert build_messages("How many?", "") == [{"role": "user", "content": "How many?"}]


def test_read_jsonl(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "records.jsonl", ['{"id": "a"}', "", '{"id": "b", "n": 1}'])
    assert read_jsonl(path) == [{"id": "a"}, {"id": "b", "n": 1}]
    assert read_jsonl(write_lines(tmp_path / "empty.jsonl", [])) == []


@pytest.mark.parametrize(
    ("bad_line", "match"), [("{oops", "malformed JSON"), ("[1]", "expected a JSON object")]
)
def test_read_jsonl_errors_name_file_and_line(tmp_path: Path, bad_line: str, match: str) -> None:
    path = write_lines(tmp_path / "records.jsonl", ['{"id": "a"}', bad_line])
    with pytest.raises(DataError, match=match) as info:
        read_jsonl(path)
    assert f"{path}:2: " in str(info.value)


def test_read_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"records\.jsonl: file not found"):
        read_jsonl(tmp_path / "records.jsonl")


def test_write_jsonl_atomic_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "rows.jsonl"
    rows = [{"id": "a", "text": "Zoë paid 5€"}, {"id": "b", "n": 1.5, "ok": True}]
    write_jsonl_atomic(path, iter(rows))
    assert read_jsonl(path) == rows
    assert path.read_text(encoding="utf-8").count("\n") == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.jsonl"]
    write_jsonl_atomic(path, rows[:1])
    assert read_jsonl(path) == rows[:1]


def test_write_json_atomic_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "m.json"
    obj = {"z": 1, "a": [1, 2], "name": "base"}
    write_json_atomic(path, obj)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == obj
    assert list(json.loads(text)) == ["z", "a", "name"]  # key order kept
    assert text.endswith("}\n")
    assert '\n  "z": 1' in text  # indent 2


def test_write_jsonl_atomic_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "out" / "rows.jsonl"
    rows = [{"id": "a"}, {"id": "b"}, {"id": "c", "bad": object()}]
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_jsonl_atomic(path, rows)
    assert list(path.parent.iterdir()) == []


def test_write_jsonl_atomic_failure_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    write_jsonl_atomic(path, [{"id": "old"}])

    def rows():
        yield {"id": "new-1"}
        raise RuntimeError("generator failed midway")

    with pytest.raises(RuntimeError, match="midway"):
        write_jsonl_atomic(path, rows())
    assert read_jsonl(path) == [{"id": "old"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_write_json_atomic_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(path, {"ok": 1, "bad": {1, 2}})
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"ok": 2, "bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"")
    assert sha256_file(path) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    with pytest.raises(DataError, match=r"missing\.bin: cannot read"):
        sha256_file(tmp_path / "missing.bin")


def test_no_torch_import() -> None:
    code = (
        "import sys, grpo.data, grpo.rewards; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_doctests() -> None:
    result = doctest.testmod(grpo.data)
    assert result.attempted > 0
    assert result.failed == 0


def test_relative_mirror_is_taken_from_the_project_in_a_queued_experiment(tmp_path):
    """`dvc exp run --queue` runs stages in <project>/.dvc/tmp/exps/<run>: a relative mirror
    such as ../shared/data/gsm8k still means the one beside the project."""
    from grpo.gsm8k import resolve_mirror

    project = tmp_path / "project"
    run_dir = project / ".dvc" / "tmp" / "exps" / "tmpab12"
    run_dir.mkdir(parents=True)
    assert resolve_mirror("../shared/gsm8k", run_dir) == tmp_path / "shared" / "gsm8k"
    assert resolve_mirror("../shared/gsm8k", project) == tmp_path / "shared" / "gsm8k"
    assert resolve_mirror("/abs/gsm8k", run_dir) == Path("/abs/gsm8k")
