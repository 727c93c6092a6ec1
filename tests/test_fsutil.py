"""Atomic outputs (grpo/fsutil.py): a body that raises leaves the folder exactly as it was (no
temp folder or file, no empty output folder, the previous output untouched); a body that
returns leaves the whole new output and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpo.fsutil import atomic_dir, atomic_files, atomic_write


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
