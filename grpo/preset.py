"""Named presets: overlays of params.yaml for known setups, applied in one command.

    python -m grpo.preset list
    python -m grpo.preset show seed-qwen2.5-1.5b       # the effective params, validated, and
                                                      # the estimated peak memory per GPU
    python -m grpo.preset apply seed-qwen2.5-1.5b      # write them into params.yaml
    python -m grpo.preset apply seed-qwen2.5-1.5b --run   # ... then `dvc exp run -n <name>`

A preset (`presets/<name>.yaml`) lists only the keys it changes; applying it writes every value
into params.yaml (comments kept), so params.yaml stays the one place a run reads and
`dvc params diff` / `dvc exp show` show every effective change.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from grpo import preflight
from grpo.config import ConfigError, Params, read_yaml

PRESETS = Path(__file__).resolve().parent.parent / "presets"


def names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_overlay(name: str) -> dict[str, Any]:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset '{name}' does not exist; choose one of {names()}")
    return yaml.safe_load(path.read_text()) or {}


def merge(base: dict[str, Any], overlay: dict[str, Any], name: str) -> dict[str, Any]:
    """`base` with the overlay's values; the result is validated against the schema."""
    merged = copy.deepcopy(base)
    for section, values in overlay.items():
        if section not in merged or not isinstance(values, dict):
            raise ConfigError(f"presets/{name}.yaml: unknown section '{section}'")
        for key, value in values.items():
            if key not in merged[section]:
                raise ConfigError(f"presets/{name}.yaml: unknown key '{section}.{key}'")
            merged[section][key] = value
    Params.from_dict(merged)
    return merged


def apply(name: str, params_path: Path) -> None:
    """Write the preset's values into params.yaml in place, keeping its comments and order."""
    base = read_yaml(params_path)  # unreadable, broken or duplicate keys: a ConfigError
    overlay = load_overlay(name)
    merge(base, overlay, name)  # validate before writing
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(params_path.read_text())
    for section, values in overlay.items():
        for key, value in values.items():
            doc[section][key] = value
    tmp = params_path.with_suffix(".yaml.tmp")
    with open(tmp, "w") as fh:
        rt.dump(doc, fh)
    tmp.replace(params_path)


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
            print("\n".join(preflight.preset_estimates(params, params.model.name)))
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
