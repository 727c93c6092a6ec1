"""How a params.yaml section is typed, read and checked, and which keys a stage read.

Owns the strict machinery under `grpo.config`'s schema: a section is a frozen dataclass whose
fields are checked against their annotations (`build`: unknown keys get the closest valid name,
missing keys and wrong types are one-line `ConfigError`s, numbers written as strings by
`dvc exp run -S` (``2e-06``) are coerced where the field is a float), YAML is read strictly
(`read_yaml`: duplicate keys are errors), and every field read is recorded (`read_keys`,
`write_trace`) so a test can compare what a stage reads with its `params:` in dvc.yaml.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from grpo.errors import UserError

_READ: set[str] = set()
_TRACKING = [True]
TRACE_ENV = "GRPO_PARAMS_TRACE"


class ConfigError(UserError):
    """params.yaml is invalid."""


class Section:
    """Base of every section: records `section.key` on each field read."""

    _name: ClassVar[str]

    def __getattribute__(self, key: str) -> Any:
        cls = object.__getattribute__(self, "__class__")
        if _TRACKING[0] and key in cls.__dataclass_fields__:
            _READ.add(f"{cls._name}.{key}")
        return object.__getattribute__(self, key)

    def validate(self) -> None:
        """Range checks across fields; raise ConfigError. Default: nothing to check."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields, without recording them as read."""
        return {f.name: object.__getattribute__(self, f.name) for f in dataclasses.fields(self)}


FIX = "fix it in params.yaml"
INT_LIMIT = 2**63
"""Integers (seeds included) must fit a signed 64-bit integer, as torch and numpy take them."""


def error(key: str, msg: str, fix: str = FIX) -> ConfigError:
    """The one-line error for `key`: what is wrong, then how to fix it."""
    return ConfigError(f"params.yaml: {key}: {msg}; {fix}")


def check(cond: bool, key: str, msg: str, fix: str = FIX) -> None:
    if not cond:
        raise error(key, msg, fix)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, coercing numeric strings for float fields."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(value, a, key)
            except ConfigError:
                continue
        raise error(key, f"expected {' or '.join(map(_type_name, args))}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise error(key, f"must be one of {list(args)}, got {value!r}", "use one of those")
    if origin is list:
        check(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        check(ok, key, f"expected an integer, got {value!r}")
        low = 0 if key.endswith("seed") else -INT_LIMIT  # seeds are non-negative everywhere
        check(low <= value < INT_LIMIT, key, f"must be in [{low}, 2**63), got {value}")
        return value
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):  # not a number: the error below says so
                number = float(value)
        if number is None:
            raise error(key, f"expected a number, got {value!r}", "write a number such as 3.0e-5")
        check(math.isfinite(number), key, f"must be a finite number, got {value!r}")
        return number
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def build(cls: type[Section], raw: Any) -> Section:
    """The section `cls` from its params.yaml mapping `raw`: every field present, no unknown
    key, each value of its annotated type (numeric strings coerced for floats), then the
    section's own `validate`; ConfigError naming `section.key` otherwise."""
    name = cls._name
    check(isinstance(raw, dict), name, f"expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            fix = f"did you mean '{name}.{close[0]}'? rename it" if close else "remove it"
            raise ConfigError(f"params.yaml: unknown key '{name}.{key}'; {fix}")
    missing = [f for f in fields if f not in raw]
    if missing:
        raise ConfigError(f"params.yaml: missing key '{name}.{missing[0]}'; add it to params.yaml")
    values = {f: coerce(raw[f], hints[f], f"{name}.{f}") for f in fields}
    section = cls(**values)
    _TRACKING[0] = False
    try:
        section.validate()
    finally:
        _TRACKING[0] = True
    return section


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, typing.Hashable):  # PyYAML's own check reports it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key}' (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML file `path`; unreadable files, syntax errors and duplicate keys raise
    ConfigError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or str(err)
        raise ConfigError(
            f"{path}: cannot read params file ({why}); check the --params path"
        ) from err
    try:
        return yaml.load(text, Loader=_StrictLoader)  # safe: a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = err.problem or err.context or "invalid YAML"
        if "duplicate key" in what:
            raise ConfigError(f"{where}: {what}; remove one of them") from err
        raise ConfigError(f"{where}: not valid YAML ({what}); fix the YAML syntax") from err
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first}); fix the YAML syntax") from err


def read_keys() -> list[str]:
    """Every `section.key` read so far in this process, sorted."""
    return sorted(_READ)


def write_trace(stage: str) -> None:
    """If $GRPO_PARAMS_TRACE names a folder, record the keys this stage read as `<stage>.json`."""
    folder = os.environ.get(TRACE_ENV)
    if folder and os.environ.get("RANK", "0") == "0":
        path = Path(folder) / f"{stage}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = set(read_keys())
        if path.exists():  # a launcher and its workers record the same stage
            keys |= set(json.loads(path.read_text()))
        path.write_text(json.dumps(sorted(keys)))
