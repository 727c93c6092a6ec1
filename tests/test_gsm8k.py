"""Tests of grpo.gsm8k: GSM8K validation with file:line errors, gold answers, records, mirrors."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
from test_fsutil import write_lines

import grpo.gsm8k
from grpo.fsutil import DataError
from grpo.gsm8k import (
    make_record,
    parse_gold,
    read_gsm8k_jsonl,
    resolve_mirror,
    validate_rows,
)

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


def test_a_question_asked_twice_names_both_places(tmp_path: Path) -> None:
    again = json.dumps({**NATALIA, "question": " " + NATALIA["question"], "answer": "#### 1"})
    path = write_lines(tmp_path / "train.jsonl", [GOOD_LINE, json.dumps(WENG), "", again])
    with pytest.raises(DataError) as info:
        read_gsm8k_jsonl(path)
    assert str(info.value) == (f"{path}:4: duplicate of line 1 (same question); remove one of them")
    with pytest.raises(DataError) as info:
        validate_rows([WENG, NATALIA, json.loads(again)], "openai/gsm8k[main]/train")
    assert str(info.value) == (
        "openai/gsm8k[main]/train: row 2: duplicate of row 1 (same question); drop one of them"
    )


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


def test_doctests() -> None:
    result = doctest.testmod(grpo.gsm8k)
    assert result.attempted > 0
    assert result.failed == 0


def test_relative_mirror_is_taken_from_the_project_in_a_queued_experiment(tmp_path):
    """`dvc exp run --queue` runs stages in <project>/.dvc/tmp/exps/<run>: a relative mirror
    such as ../shared/data/gsm8k still means the one beside the project."""
    project = tmp_path / "project"
    run_dir = project / ".dvc" / "tmp" / "exps" / "tmpab12"
    run_dir.mkdir(parents=True)
    assert resolve_mirror("../shared/gsm8k", run_dir) == tmp_path / "shared" / "gsm8k"
    assert resolve_mirror("../shared/gsm8k", project) == tmp_path / "shared" / "gsm8k"
    assert resolve_mirror("/abs/gsm8k", run_dir) == Path("/abs/gsm8k")
