"""File I/O: atomic outputs, JSON/JSONL files with file:line errors, and file hashes.

Owns the rule that no stage ever leaves a half-written output behind (a folder or file is written
under a temporary name, fsynced, then renamed into place), that a stage checks its output
locations can be written before its long work starts (`check_writable`), and how an input file
that cannot be read is reported: `DataError`, one line naming the file and line and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from grpo.errors import UserError

_FIX_LINE = "fix or remove the line"


class DataError(UserError, ValueError):
    """Bad input data; message is one line naming file:line and the fix."""


def short_repr(value: Any, limit: int = 40) -> str:
    """repr of `value` cut to `limit` characters, for one-line messages.

    >>> short_repr("x" * 50)
    "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx..."
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unwritable(path: Path, err: OSError) -> UserError:
    return UserError(
        f"{path}: cannot write the output ({err.strerror}: {err.filename}); make its parent a "
        f"writable folder or choose another output path"
    )


def check_writable(*paths: str | Path) -> None:
    """Fail at once, with a UserError naming the path, when an output file or folder cannot be
    created: its parent folders are created and a scratch file is written there, then both are
    removed again, so a stage that fails later leaves no empty folder (the writers create them).

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "file").write_text("x")
    1
    >>> check_writable(root / "a" / "b" / "out.json")
    >>> sorted(p.name for p in root.iterdir())
    ['file']
    >>> check_writable(root / "file" / "out.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    grpo.errors.UserError: .../file/out.json: cannot write the output (...); make its parent ...
    """
    for path in map(Path, paths):
        missing = [p for p in path.parents if not p.exists()]  # nearest first
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path.parent):
                pass
        except OSError as err:
            raise _unwritable(path, err) from err
        finally:
            for folder in missing:
                with suppress(OSError):  # only if still empty: another writer may use it
                    folder.rmdir()


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `out_dir`; on success it replaces `out_dir`, on error it goes.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_dir(root / "out") as tmp:
    ...     _ = (tmp / "a.txt").write_text("x")
    >>> sorted(p.name for p in root.iterdir()), (root / "out" / "a.txt").read_text()
    (['out'], 'x')
    """
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    except OSError as err:
        raise _unwritable(out_dir, err) from err
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_files(*paths: str | Path) -> Iterator[list[Path]]:
    """Yield one temp path beside each of `paths`; when the body returns, every temp file is
    renamed onto its path, back to back; on error they all go and no path changes.

    For outputs that belong together (evaluate's predictions and metrics): a failure while
    writing one of them never leaves the other new beside an old one.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_files(root / "a.txt", root / "b.txt") as (a, b):
    ...     _ = a.write_text("a"), b.write_text("b")
    >>> sorted(p.name for p in root.iterdir())
    ['a.txt', 'b.txt']
    """
    paths = [Path(p) for p in paths]
    temps = [p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp") for p in paths]
    try:
        yield temps
        for tmp, path in zip(temps, paths, strict=True):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write(
    path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = False
) -> None:
    """Run `write` on a temp file beside `path`, fsync it and rename it onto `path`.

    On any exception the temp file is removed and the exception re-raised, so `path` is either
    the complete new file or whatever it was before.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 so the file gets the usual umask-derived mode (mkstemp: 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise _unwritable(path, err) from err
    try:
        mode = {"mode": "wb"} if binary else {"mode": "w", "encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, **mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
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


def read_jsonl(path: str | Path, strings: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-blank line; DataError naming file:line.

    String `id`s, where objects have them, must be unique (records and predictions are keyed
    by id); every object must hold the keys `strings` with string values (prepared records:
    a stage reads them long after it starts).
    """
    path = Path(path)
    rows, first_line = [], {}
    for lineno, obj in json_lines(path):
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
                    f"{path}:{lineno}: duplicate id {short_repr(key)} (first on line "
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
