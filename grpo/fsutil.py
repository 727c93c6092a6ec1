"""Atomic outputs: a folder is written under a temporary name and renamed into place.

Owns the rule that no stage ever leaves a half-written output behind, and that a stage checks
its output locations can be written before its long work starts (`check_writable`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from grpo.errors import UserError


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
