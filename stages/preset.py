"""Named presets: overlays of params.yaml for known setups, applied in one command.

    python -m stages.preset list
    python -m stages.preset show seed-qwen2.5-1.5b       # the effective params, validated, and
                                                        # the estimated peak memory per GPU
    python -m stages.preset apply seed-qwen2.5-1.5b      # write them into params.yaml
    python -m stages.preset apply seed-qwen2.5-1.5b --run   # ... then `dvc exp run -n <name>`

The presets themselves and how they merge into params.yaml: `grpo.preset`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from grpo import memory
from grpo.config import Params
from grpo.preset import apply, load_overlay, merge, names
from grpo.schema import ConfigError, read_yaml


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["list", "show", "apply"])
    p.add_argument("name", nargs="?")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--run", action="store_true", help="after apply: dvc exp run -n <name>")
    args = p.parse_args(argv)
    try:
        if args.action == "list":
            print("\n".join(names()))
            return 0
        if not args.name:
            raise ConfigError(f"name a preset: one of {names()}")
        if args.action == "show":
            base = read_yaml(args.params)
            merged = merge(base, load_overlay(args.name), args.name)
            print(yaml.safe_dump(merged, sort_keys=False), end="")
            params = Params.from_dict(merged)
            print("\n".join(memory.preset_estimates(params, params.model.name)))
            return 0
        apply(args.name, args.params)
        print(f"{args.params}: preset '{args.name}' applied")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.run:
        return subprocess.run(["dvc", "exp", "run", "-n", args.name], check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
