"""The install works from public indexes only: the lock pins no wheel that only one machine has,
and the Makefile takes torch's CPU build on machines without an NVIDIA driver, PyPI's CUDA build
on machines with one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)$")


def lock_pins() -> dict[str, str]:
    pins = {}
    for number, line in enumerate((REPO / "requirements.lock").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock:{number}: not a `name==version` pin: {line!r}"
        pins[match["name"].lower().replace("_", "-")] = match["version"]
    return pins


def test_lock_has_no_local_version_labels():
    """`torch==2.13.0+cpu` installs only where that file lies on disk: public indexes serve
    2.13.0 (PyPI, CUDA build) and 2.13.0+cpu only from PyTorch's own index, which the pin
    `==2.13.0` also accepts."""
    local = {name: v for name, v in lock_pins().items() if "+" in v}
    assert not local, f"requirements.lock pins local versions {local}; pin the public version"


def test_lock_satisfies_the_project_dependencies():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = lock_pins()
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"requirements.lock has no pin for {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


def _make_setup_commands(tmp_path: Path, with_driver: bool) -> str:
    """What `make setup` would run (dry run, every target out of date) on a machine with or
    without `nvidia-smi` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python3", "sh", "bash"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    if with_driver:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_INDEX"}
    env["PATH"] = str(bin_dir)
    make = shutil.which("make")
    proc = subprocess.run(
        [make, "-n", "-B", "setup"], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_takes_the_cpu_build_without_a_driver(tmp_path):
    out = _make_setup_commands(tmp_path, with_driver=False)
    torch_line = next(line for line in out.replace("\\\n", " ").splitlines() if " torch" in line)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in torch_line
    assert "-c requirements.lock" in torch_line


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_takes_pypi_cuda_build_with_a_driver(tmp_path):
    out = _make_setup_commands(tmp_path, with_driver=True)
    assert "download.pytorch.org" not in out
    assert re.search(r"-c requirements.lock\s+--no-deps torch", out.replace("\\\n", " "))
