"""dvc.yaml lists, for every stage, exactly the project code its entry point imports
(transitively): each module of `grpo/` or `stages/` as its file, and each subpackage
(`grpo/kernels`, `grpo/decoding`) as its folder, which covers every file in it, C sources
included.

A module missing from `deps:` means editing it would not rerun the stage (stale results that
look current); an extra one means needless reruns.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from grpo import kernels

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("grpo", "stages")


def _unit(name: str) -> str | None:
    """The dep that covers the project module `name` (dotted): a subpackage's folder, or the
    module's file; None outside the project."""
    parts = name.split(".")
    if parts[0] not in PACKAGES or len(parts) < 2:
        return None
    folder = Path(*parts[:2])
    if (REPO / folder / "__init__.py").is_file():
        return folder.as_posix()
    module = folder.with_suffix(".py")
    return module.as_posix() if (REPO / module).is_file() else None


def _files(unit: str) -> list[Path]:
    """The Python files of a dep: the module itself, or every module in the folder."""
    path = REPO / unit
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _imports(unit: str) -> set[str]:
    """Deps (module files, subpackage folders) of the project code `unit` imports."""
    found = set()
    for path in _files(unit):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
            found |= {u for u in map(_unit, names) if u is not None and u != unit}
    return found


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        unit = todo.pop()
        if unit not in seen:
            seen.add(unit)
            todo.extend(_imports(unit))
    return seen


def _stages():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in spec.items():
        stage = stage.get("do", stage)
        yield name, stage["cmd"], stage["deps"]


def _is_code(dep: str) -> bool:
    """A dep that is project code: a module file or a subpackage folder of grpo/ or stages/."""
    if not dep.startswith(tuple(f"{p}/" for p in PACKAGES)):
        return False
    return dep.endswith(".py") or (REPO / dep / "__init__.py").is_file()


@pytest.mark.parametrize("name,cmd,deps", list(_stages()), ids=[s[0] for s in _stages()])
def test_stage_deps_are_the_code_its_entry_point_imports(name, cmd, deps):
    entry = re.search(r"python -m (stages\.\w+)", cmd).group(1).replace(".", "/") + ".py"
    listed = {d for d in deps if _is_code(d)}
    imported = _closure(entry)
    assert not imported - listed, f"{name}: add to deps in dvc.yaml: {sorted(imported - listed)}"
    assert not listed - imported, f"{name}: not imported, drop: {sorted(listed - imported)}"
    # grpo.kernels compiles its C sources and headers into one library: a stage that imports it
    # depends on them, through its folder (never listed one by one beside it)
    sources = set()
    if "grpo/kernels" in imported:
        sources = {p.relative_to(REPO).as_posix() for p in kernels.SOURCES + kernels.HEADERS}
    folders = tuple(f"{d}/" for d in listed if not d.endswith(".py"))
    assert all(s.startswith(folders) for s in sources), f"{name}: its folders miss {sources}"
    listed_sources = {d for d in deps if d.endswith((".c", ".h"))}
    assert not listed_sources, f"{name}: C sources are covered by their folder: {listed_sources}"


def test_folder_deps_hash_no_bytecode():
    """DVC hashes every file of a folder dep: Python's bytecode caches (written on import, and
    absent from a fresh clone) must not count, or a checkout would look like a code change."""
    from dvc.repo import Repo

    folders = {d for _, _, deps in _stages() for d in deps if _is_code(d) and not d.endswith(".py")}
    assert folders
    with Repo(str(REPO)) as repo:
        for folder in sorted(folders):
            assert repo.dvcignore.is_ignored_dir(str(REPO / folder / "__pycache__")), folder
