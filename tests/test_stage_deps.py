"""dvc.yaml lists, for every stage, exactly the project modules its code imports (transitively),
and the C sources those modules compile.

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


def _imports(path: Path) -> set[str]:
    """Project modules (as repo-relative .py paths) imported anywhere in `path`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] in PACKAGES and len(parts) >= 2:
                candidate = Path(*parts[:2]).with_suffix(".py")
                if (REPO / candidate).is_file():
                    found.add(candidate.as_posix())
    return found


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports(REPO / module))
    return seen


def _stages():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in spec.items():
        stage = stage.get("do", stage)
        yield name, stage["cmd"], stage["deps"]


@pytest.mark.parametrize("name,cmd,deps", list(_stages()), ids=[s[0] for s in _stages()])
def test_stage_deps_are_the_modules_its_code_imports(name, cmd, deps):
    entry = re.search(r"python -m (stages\.\w+)", cmd).group(1).replace(".", "/") + ".py"
    listed = {d for d in deps if d.endswith(".py")}
    imported = _closure(entry)
    assert not imported - listed, f"{name}: add to deps in dvc.yaml: {sorted(imported - listed)}"
    assert not listed - imported, f"{name}: not imported, drop: {sorted(listed - imported)}"
    # a module with a C source of the same name (grpo/skinny_gemm.c) depends on it too, and
    # grpo/kernels.py compiles every C source and header it lists into one library
    sources = {Path(m).with_suffix(".c").as_posix() for m in imported}
    sources = {s for s in sources if (REPO / s).is_file()}
    if "grpo/kernels.py" in imported:
        sources |= {p.relative_to(REPO).as_posix() for p in kernels.SOURCES + kernels.HEADERS}
    listed_sources = {d for d in deps if d.endswith((".c", ".h"))}
    assert sources == listed_sources, f"{name}: C sources in deps should be {sorted(sources)}"
