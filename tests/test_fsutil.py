"""File I/O (grpo/fsutil.py). Atomic outputs: a body that raises leaves the folder exactly as it
was (no temp folder or file, no empty output folder, the previous output untouched); a body that
returns leaves the whole new output and nothing else. JSON/JSONL files: round trips, and errors
naming file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo.errors import UserError
from grpo.fsutil import (
    DataError,
    atomic_dir,
    atomic_files,
    atomic_write,
    read_jsonl,
    sha256_file,
    write_json_atomic,
    write_jsonl_atomic,
)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None), empty folders and hidden names included."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in folder.rglob("*")
    }


class Boom(Exception):
    pass


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-previous"])
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_dir_leaves_nothing_behind_when_the_body_raises(tmp_path, previous, error):
    out = tmp_path / "sub" / "out"
    if previous:
        out.mkdir(parents=True)
        (out / "old.txt").write_text("old")
    before = _tree(tmp_path)
    with pytest.raises(error), atomic_dir(out) as tmp:
        (tmp / "nested").mkdir()
        (tmp / "nested" / "half.bin").write_bytes(b"half")
        (tmp / "empty").mkdir()
        raise error
    after = _tree(tmp_path)
    if not previous:  # the parent it created may stay, empty; nothing inside it
        assert after.pop("sub", "absent") is None
    assert after == before


def test_atomic_dir_gives_the_whole_output_in_place_of_the_previous(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "a.txt").write_text("a")
        (tmp / "d").mkdir()
        (tmp / "d" / "b.txt").write_text("b")
        assert (out / "old.txt").read_text() == "old"  # untouched until the body returns
    assert _tree(tmp_path) == {"out": None, "out/a.txt": b"a", "out/d": None, "out/d/b.txt": b"b"}


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-previous"])
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_atomic_write_leaves_nothing_behind_when_the_writer_raises(tmp_path, previous, binary):
    path = tmp_path / "metrics.json"
    if previous:
        path.write_text("old")
    before = _tree(tmp_path)

    def write(handle):
        handle.write(b"half" if binary else "half")
        handle.flush()
        raise Boom

    with pytest.raises(Boom):
        atomic_write(path, write, binary=binary)
    assert _tree(tmp_path) == before


def test_atomic_write_gives_the_whole_file(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    atomic_write(path, lambda h: h.write("a\nb\n"))
    atomic_write(path, lambda h: h.write("c\n"))
    assert _tree(tmp_path) == {"sub": None, "sub/rows.jsonl": b"c\n"}


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_files_replace_all_or_none(tmp_path, error):
    paths = [tmp_path / "predictions.jsonl", tmp_path / "metrics.json"]
    for path in paths:
        path.write_text("old")
    before = _tree(tmp_path)
    with pytest.raises(error), atomic_files(*paths) as temps:
        temps[0].write_text("new")  # one written in full, the other not yet
        raise error
    assert _tree(tmp_path) == before
    with atomic_files(*paths) as temps:
        for tmp in temps:
            tmp.write_text("new")
    assert _tree(tmp_path) == {"predictions.jsonl": b"new", "metrics.json": b"new"}


def test_data_error_is_a_user_error_and_a_value_error() -> None:
    assert issubclass(DataError, UserError)
    assert issubclass(DataError, ValueError)


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
