"""Named presets: overlays of params.yaml for known setups, merged and applied (`stages.preset`).

A preset (`presets/<name>.yaml`) lists only the keys it changes; applying it writes every value
into params.yaml (comments kept), so params.yaml stays the one place a run reads and
`dvc params diff` / `dvc exp show` show every effective change.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from grpo.config import Params
from grpo.schema import ConfigError, read_yaml

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
