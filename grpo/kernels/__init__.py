"""The optional C kernels of CPU decoding and sampling: build, load and ctypes signatures.

Owns the build of `csrc/`: `skinny_gemm.c` (decode GEMMs, `grpo.kernels.skinny_gemm`),
`llama_step.c` (a llama/qwen2 decode step's layers, `grpo.decoding.llama`) and `gumbel.c`
(Gumbel-max sampling, `grpo.sampling`), with `vector_math.h`, all AVX2 + FMA with OpenMP on the
threads torch already runs (same libgomp). They are compiled with the system C compiler on first
use into one shared library in a cache directory (`$GRPO_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/grpo-gsm8k`, else `~/.cache/grpo-gsm8k`), keyed by a hash of sources and flags,
atomically (temp file, rename), and loaded with ctypes.

Where the library cannot be built (not x86-64 with AVX2, no compiler, a compile error)
`library()` is None after one warning per process, and every caller takes its torch path.
`GRPO_KERNELS=0` turns the kernels off (same results up to float summation order).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "skinny_gemm.c", CSRC / "llama_step.c", CSRC / "gumbel.c")
HEADERS = (CSRC / "vector_math.h",)
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


def _cache_dir() -> Path:
    if os.environ.get("GRPO_KERNEL_CACHE"):
        return Path(os.environ["GRPO_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "grpo-gsm8k"


def _unavailable(reason: str) -> None:
    log.warning("grpo.kernels: %s; decoding and sampling use torch (slower on CPU)", reason)


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCES into one library `target`, atomically (temp file in its folder, renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (after one warning) where it cannot be built or is off."""
    if os.environ.get("GRPO_KERNELS", "1") == "0":
        log.info("grpo.kernels: off (GRPO_KERNELS=0); decoding and sampling use torch")
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _unavailable(f"the kernel is x86-64 AVX2 code, this is {platform.machine()}")
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        _unavailable(f"this CPU lacks AVX2/FMA ({torch.backends.cpu.get_cpu_capability()})")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not shutil.which(compiler):
        _unavailable("no C compiler found (install gcc or set CC)")
        return None
    code = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    digest = hashlib.sha256(code + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{digest}.so"
    if not target.exists():
        try:
            _build(compiler, target)
        except subprocess.CalledProcessError as err:
            lines = (err.stderr or "").strip().splitlines()
            detail = lines[0] if lines else f"exit status {err.returncode}"
            names = ", ".join(source.name for source in SOURCES)
            _unavailable(f"compiling {names} with {compiler} failed: {detail}")
            return None
        except OSError as err:
            _unavailable(f"cannot build into {target.parent}: {err} (set GRPO_KERNEL_CACHE)")
            return None
    lib = ctypes.CDLL(str(target))
    lib.skinny_gemm.restype = None
    lib.skinny_gemm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int] * 2
    lib.llama_step.restype = None
    lib.llama_step.argtypes = [ctypes.c_void_p] * 9
    lib.gumbel_argmax.restype = None
    lib.gumbel_argmax.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 2 + [ctypes.c_float]
    lib.gumbel_argmax.argtypes += [ctypes.c_void_p] * 3 + [ctypes.c_int]
    return lib
