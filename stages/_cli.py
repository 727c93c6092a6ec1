"""Shared plumbing of the stage CLIs: argument parsing, logging, user errors, params trace.

A `UserError` (bad params, data, model or path) becomes one line on stderr and exit code 2
(or the error's own `exit_code`, e.g. 143 after SIGTERM);
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from grpo import config
from grpo.errors import UserError


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the `--params` option every stage takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def run(stage: str, main: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run a stage's main; turn user errors into a one-line message and exit code 2."""
    logging.basicConfig(level=logging.INFO, format=f"[{stage}] %(message)s")
    try:
        main(args)
    except UserError as err:
        print(f"error [{stage}]: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
    config.write_trace(stage)
