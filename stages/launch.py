"""Run any command as several workers under our launcher (`grpo.launch`).

    python -m stages.launch --nproc-per-node 2 -- python script.py ...

Each worker gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
several nodes, stop signals and failures behave as `grpo.launch` documents.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from grpo.launch import LaunchError, run, topology


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nproc-per-node", type=int, required=True, help="workers on this node")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the worker command")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give the worker command after --")
    logging.basicConfig(level=logging.INFO, format="[launch] %(message)s")
    try:
        error = run(cmd, topology(args.nproc_per_node)).error("launch")
    except LaunchError as err:
        error = err
    if error is not None:
        print(f"error [launch]: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
