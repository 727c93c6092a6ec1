"""GSM8K rows, gold-answer parsing, prompts, SFT targets and JSON/JSONL file I/O.

Owns what a valid GSM8K row is (a non-empty string `question`, asked once per split, and an
`answer` whose text after the last "####" is a number), the prepared record format
``{"id", "question", "solution", "gold"}`` (ids unique), the chat messages a question becomes,
the SFT target a reference solution becomes, and the rule that a JSON output file is either
complete or absent (written to a temporary file beside it, fsynced, then renamed into place).

Bad input raises `DataError`, whose one-line message names the file and line (or the dataset and
row) and the fix.

>>> row = {"question": " Natalia sold 48 clips in April and half as many in May. Total? ",
...        "answer": "In May: 48/2 = <<48/2=24>>24\\nTotal: 48+24 = <<48+24=72>>72\\n#### 72"}
>>> record = make_record("train", 3, row)
>>> record["id"], record["question"][:14], record["gold"]
('train-00003', 'Natalia sold 4', '72')
>>> print(sft_completion(record["solution"], record["gold"]))
<reasoning>
In May: 48/2 = 24
Total: 48+24 = 72
</reasoning>
<answer>
72
</answer>
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from grpo.errors import UserError
from grpo.fsutil import atomic_write
from grpo.rewards import normalize_number

_CALCULATOR = re.compile(r"<<[^<>\n]*>>")
_FIX_LINE = "fix or remove the line"
_FIX_ROW = "fix or drop the row"


class DataError(UserError, ValueError):
    """Bad input data; message is one line naming file:line and the fix."""


def _short(value: Any, limit: int = 40) -> str:
    """repr of `value` cut to `limit` characters, for one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_gold(answer: str) -> str:
    """The normalized number after the last "####" of a GSM8K answer.

    >>> parse_gold("48+24 = <<48+24=72>>72\\n#### 1,080")
    '1080'
    >>> parse_gold("#### abc")
    Traceback (most recent call last):
    ...
    ValueError: gold answer 'abc' is not a number
    """
    if "####" not in answer:
        raise ValueError("no '####' before the final answer")
    tail = answer.rsplit("####", 1)[1].strip()
    gold = normalize_number(tail)
    if gold is None:
        raise ValueError(f"gold answer {_short(tail)} is not a number")
    return gold


def _check_row(row: Any, where: str, fix: str) -> dict[str, str]:
    """{"question", "answer"} of one raw row; DataError naming `where` if it is not valid."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}; {fix}")
    for key in ("question", "answer"):
        if key not in row:
            raise DataError(f"{where}: missing '{key}'; {fix}")
        if not isinstance(row[key], str):
            kind = type(row[key]).__name__
            raise DataError(f"{where}: '{key}' must be a string, got {kind}; {fix}")
        if not row[key].strip():
            raise DataError(f"{where}: '{key}' is empty; {fix}")
    try:
        parse_gold(row["answer"])
    except ValueError as err:
        raise DataError(f"{where}: {err} in 'answer'; {fix}") from err
    return {"question": row["question"], "answer": row["answer"]}


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line; DataError on unreadable files/lines."""
    try:
        with path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start + 1} "
                        f"of the line); fix that line or re-save the file as UTF-8"
                    ) from err
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}); "
                        f"{_FIX_LINE}"
                    ) from err
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found; check the path") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror}); check the path") from err


def read_gsm8k_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Validated rows {"question", "answer"} of an official-format GSM8K JSONL file.

    Blank lines are skipped and extra keys ignored; any bad line, or a file without rows, raises
    `DataError` naming the file and line.
    """
    path = Path(path)
    rows, first_line = [], {}
    for lineno, obj in _json_lines(path):
        row = _check_row(obj, f"{path}:{lineno}", _FIX_LINE)
        question = row["question"].strip()
        if question in first_line:
            raise DataError(
                f"{path}:{lineno}: duplicate of line {first_line[question]} (same question); "
                f"remove one of them"
            )
        first_line[question] = lineno
        rows.append(row)
    if not rows:
        raise DataError(
            f"{path}: no rows; write one JSON object {{question, answer}} per line, or point "
            f"data.mirrors at the official files"
        )
    return rows


def validate_rows(rows: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, str]]:
    """Validated rows {"question", "answer"} from another source (e.g. the Hugging Face hub).

    >>> validate_rows([{"question": "1+1?", "answer": "#### 2"}, {"question": "?"}], "hub/train")
    Traceback (most recent call last):
    ...
    grpo.data.DataError: hub/train: row 1: missing 'answer'; fix or drop the row
    """
    checked, first_row = [], {}
    for i, raw in enumerate(rows):
        row = _check_row(raw, f"{source}: row {i}", _FIX_ROW)
        question = row["question"].strip()
        if question in first_row:
            raise DataError(
                f"{source}: row {i}: duplicate of row {first_row[question]} (same question); "
                f"drop one of them"
            )
        first_row[question] = i
        checked.append(row)
    if not checked:
        raise DataError(f"{source}: no rows; check the dataset name, config and split")
    return checked


def make_record(split: str, index: int, row: Mapping[str, str]) -> dict[str, str]:
    """The prepared record of row `index` of `split`: id, stripped question, solution, gold."""
    return {
        "id": f"{split}-{index:05d}",
        "question": row["question"].strip(),
        "solution": row["answer"],
        "gold": parse_gold(row["answer"]),
    }


def strip_calculator(solution: str) -> str:
    """`solution` without GSM8K calculator annotations.

    >>> strip_calculator("48/2 = <<48/2=24>>24 clips")
    '48/2 = 24 clips'
    """
    return _CALCULATOR.sub("", solution)


def reasoning_text(solution: str) -> str:
    """The worked solution without annotations and without the final "#### x" line.

    >>> reasoning_text("12/60 = $<<12/60=0.2>>0.2 per minute.\\n#### 10")
    '12/60 = $0.2 per minute.'
    """
    return strip_calculator(solution).rsplit("####", 1)[0].strip()


def sft_completion(solution: str, gold: str) -> str:
    """The SFT target for a reference solution, in the answer format (the caller appends EOS)."""
    return f"<reasoning>\n{reasoning_text(solution)}\n</reasoning>\n<answer>\n{gold}\n</answer>"


def build_messages(question: str, system: str) -> list[dict[str, str]]:
    """Chat messages for a question: the system prompt (omitted when "") then the user turn.

    >>> build_messages("2+2?", "")
    [{'role': 'user', 'content': '2+2?'}]
    """
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": question}]


def read_jsonl(path: str | Path, strings: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-blank line; DataError naming file:line.

    String `id`s, where objects have them, must be unique (records and predictions are keyed
    by id); every object must hold the keys `strings` with string values (prepared records:
    a stage reads them long after it starts).
    """
    path = Path(path)
    rows, first_line = [], {}
    for lineno, obj in _json_lines(path):
        if not isinstance(obj, dict):
            kind = type(obj).__name__
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {kind}; {_FIX_LINE}")
        for name in strings:
            if not isinstance(obj.get(name), str):
                raise DataError(
                    f"{path}:{lineno}: missing '{name}' or not a string; re-create the file "
                    f"(dvc repro prepare) or {_FIX_LINE}"
                )
        key = obj.get("id")
        if isinstance(key, str):
            if key in first_line:
                raise DataError(
                    f"{path}:{lineno}: duplicate id {_short(key)} (first on line "
                    f"{first_line[key]}); remove or rename one of them"
                )
            first_line[key] = lineno
        rows.append(obj)
    return rows


def write_jsonl_atomic(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write `rows` as JSON lines to `path` atomically (complete file or no change).

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "sub" / "rows.jsonl"
    >>> write_jsonl_atomic(out, [{"id": "a"}, {"id": "b"}])
    >>> read_jsonl(out)
    [{'id': 'a'}, {'id': 'b'}]
    """

    def write(handle: IO[str]) -> None:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(path, write)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write one JSON document (indent 2, key order kept, trailing newline) atomically."""

    def write(handle: IO[str]) -> None:
        json.dump(obj, handle, indent=2, sort_keys=False, ensure_ascii=False)
        handle.write("\n")

    atomic_write(path, write)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
    >>> _ = f.write_bytes(b"abc")
    >>> sha256_file(f)[:16]
    'ba7816bf8f01cfea'
    """
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror}); check the path") from err
    return digest.hexdigest()
