"""The layout README promises: every library file listed, the pure leaves torch-free, no import
cycle, no entry point inside the library, and modules small enough to read."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GRPO = REPO / "grpo"
MAX_LINES = 400


def _layout_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Layout") :]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def _listed() -> dict[str, bool]:
    """{path under grpo/ as README's Layout names it: marked pure (*)}, folders ending in /."""
    listed, folder = {}, []
    for line in _layout_block().splitlines():
        m = re.match(r"^(\s*)(\S+)( \*)?\s", line + " ")
        if not m or line.startswith(" " * 20):  # a description's continuation line
            continue
        depth, name = len(m.group(1)) // 2, m.group(2)
        folder = [*folder[:depth], name]
        if folder[0] == "grpo/" and depth > 0:
            listed["".join(folder[1:])] = bool(m.group(3))
    return listed


def _library_files() -> set[str]:
    files = set()
    for path in GRPO.rglob("*"):
        rel = path.relative_to(GRPO)
        if "__pycache__" in rel.parts:
            continue
        if path.is_dir():
            files.add(f"{rel.as_posix()}/")
        elif path.suffix == ".py" and path.parent != GRPO / "kernels" / "csrc":
            files.add(rel.as_posix())
    return files - {"__init__.py"}


def test_readme_layout_lists_every_library_file_and_folder():
    listed = set(_listed())
    # the C sources are listed by their folder's line
    assert _library_files() - listed == set(), "add these to README's Layout"
    assert listed - _library_files() == set(), "README's Layout names files that do not exist"


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(path: Path) -> set[str]:
    """The grpo modules `path` imports at module level (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            # `from package import submodule` does not use the package's own code
            names = [n if _source(n) else node.module for n in names]
        else:
            continue
        for name in names:
            if name.split(".")[0] != "grpo":
                continue
            while name and not _source(name):
                name = name.rpartition(".")[0]
            if name and name != "grpo":
                found.add(name)
    return found


def _source(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def test_no_import_cycle():
    graph = {_module(p): _project_imports(p) - {_module(p)} for p in GRPO.rglob("*.py")}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_pure_leaves_import_no_torch():
    leaves = sorted(name for name, pure in _listed().items() if pure)
    assert {"rewards.py", "answer_format.py", "gsm8k.py", "prompts.py"} <= set(leaves)
    modules = [f"grpo.{name.removesuffix('.py').replace('/', '.')}" for name in leaves]
    code = (
        "import sys\n"
        f"for m in {modules!r}:\n"
        "    __import__(m)\n"
        "heavy = sorted({'torch', 'transformers', 'datasets'} & set(sys.modules))\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"a module marked * in README imports {out.stdout.strip()}"


def test_the_library_holds_no_entry_point():
    for path in GRPO.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "main" not in names, f"{path}: entry points live in stages/"
        assert "__main__" not in path.read_text(), f"{path}: no `if __name__` in the library"


def test_modules_stay_small_enough_to_read():
    sizes = {p: len(p.read_text().splitlines()) for p in GRPO.rglob("*.py")}
    assert {str(p.relative_to(REPO)): n for p, n in sizes.items() if n > MAX_LINES} == {}
