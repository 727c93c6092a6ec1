"""Shared plumbing of the stage CLIs: argument parsing, logging, user errors, params trace.

A `UserError` (bad params, data, model or path) becomes one line on stderr and exit code 2
(or the error's own `exit_code`, e.g. 143 after SIGTERM), and so does a full disk, file-size
limit or quota while writing; Ctrl-C becomes one line and exit code 130. Any other exception is a
bug and keeps its traceback. Outputs are written atomically, so none of these leaves half a file.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable

from tqdm import tqdm

from grpo import schema
from grpo.errors import UserError

DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
"""Write errors that are the disk's or the limits' fault, not a bug."""


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the `--params` option every stage takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def _fail(stage: str, message: str, code: int) -> None:
    """End the stage with `error [<stage>]: <message>` on a line of its own, and `code`."""
    for bar in list(getattr(tqdm, "_instances", ())):  # a live progress bar owns the line
        bar.close()
    print(f"error [{stage}]: {message}", file=sys.stderr)
    sys.exit(code)


def run(stage: str, main: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run a stage's main; turn user errors into a one-line message and exit code 2."""
    logging.basicConfig(level=logging.INFO, format=f"[{stage}] %(message)s")
    try:
        main(args)
    except UserError as err:
        _fail(stage, str(err), getattr(err, "exit_code", 2))
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        where = err.filename or getattr(args, "out", None) or "an output"
        _fail(
            stage,
            f"{where}: cannot write ({err.strerror or os.strerror(err.errno)}); make room on "
            f"that disk (or raise the file-size limit or quota) and rerun the stage",
            2,
        )
    except KeyboardInterrupt:
        _fail(stage, "interrupted, nothing written; use dvc repro to run it again", 130)
    schema.write_trace(stage)
