"""`make mutate`: mutation testing (mutmut 3) of the loss, answer format, rewards and trainer step.

Owns which code is mutated and which tests judge each mutant. Each target runs mutmut in its own
copy of the project, build/mutate/<target>/ (kept for `mutmut show <name>` there), mutating one
file, or only the named functions of it, and running each mutant against that target's tests
only (mutmut narrows them further to the tests that call the mutated function). Prints killed /
survived / timeout per file and the kill rate; exits 1 when a survivor is not listed in
mutate/equivalent.txt (one `<mutant name>  <reason>` a line) or the kill rate is under 90%.

    python mutate/run.py [loss answer_format rewards trainer]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "build" / "mutate"
EQUIVALENT = REPO / "mutate" / "equivalent.txt"
TARGET_RATE = 0.90
# mutmut's exit-code verdicts (mutmut.stats.status_by_exit_code), folded into four columns
KILLED, SURVIVED, TIMEOUT = {1, 3, 37}, {0}, {24, -24, 36, 152, 255}


@dataclass(frozen=True)
class Target:
    source: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()  # mutmut's mangled names; empty = every function
    """`x_<function>` or `xǁ<Class>ǁ<method>`."""
    slow: tuple[str, ...] = ()  # tests left out: each surviving mutant would run them


TARGETS = {
    "loss": Target("grpo/loss.py", ("tests/test_loss.py",)),
    "answer_format": Target(
        "grpo/answer_format.py", ("tests/test_answer_format.py", "tests/test_rewards.py")
    ),
    "rewards": Target("grpo/rewards.py", ("tests/test_rewards.py",)),
    "batches": Target("grpo/batches.py", ("tests/test_batches.py",)),
    "trainer": Target(
        "grpo/trainer.py",
        (
            "tests/test_trainer.py",
            "tests/test_trainer_wiring.py",
            "tests/test_trl_oracle.py",
            "tests/test_trainer_mutants.py",
            "tests/test_lora.py",  # the LoRA reference branch of rollout
        ),
        ("xǁGRPOTrainerǁrollout", "xǁGRPOTrainerǁupdate"),
        (  # ~10 s each; they check that runs repeat, which the faster tests check by value
            "tests/test_trainer.py::test_gradient_checkpointing_trains_the_same_weights",
            "tests/test_trainer.py::test_same_seed_gives_identical_metrics",
        ),
    ),
}


def _config(target: Target, tests: list[str]) -> str:
    """The [tool.mutmut] table appended to the copy's pyproject.toml."""
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["grpo"]\n'
        f"only_mutate = {json.dumps([target.source])}\n"
        'also_copy = ["stages", "params.yaml"]\n'
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        # torch is not fork-safe once used: fork mutants from a server that only collected tests
        'process_isolation = "forkserver"\n'
        "use_git_change_detection = false\n"
    )


def _prepare(name: str, target: Target) -> tuple[Path, list[str]]:
    """A fresh copy of the sources, tests and config under build/mutate/<name>/."""
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("grpo", "stages", "tests"):
        shutil.copytree(REPO / folder, work / folder, ignore=ignore)
    tests = [t for t in target.tests if (REPO / t).exists()]
    tests += [arg for test in target.slow for arg in ("--deselect", test)]
    shutil.copy2(REPO / "params.yaml", work / "params.yaml")  # the trainer tests read it
    text = (REPO / "pyproject.toml").read_text()
    (work / "pyproject.toml").write_text(text + _config(target, tests))
    return work, tests


def _verdicts(work: Path, target: Target) -> dict[str, int | None]:
    """Exit code of each mutant of the target's functions (None: not run)."""
    meta = json.loads((work / "mutants" / f"{target.source}.meta").read_text())
    module = target.source.removesuffix(".py").replace("/", ".")
    wanted = [f"{module}.{f}__mutmut_*" for f in target.functions] or ["*"]
    return {
        key: code
        for key, code in meta["exit_code_by_key"].items()
        if any(fnmatch(key, pattern) for pattern in wanted)
    }


def _equivalent() -> dict[str, str]:
    listed = {}
    for line in EQUIVALENT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, reason = line.partition(" ")
            listed[key] = reason.strip()
    return listed


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        print(f"mutate/run.py: unknown targets {unknown}; choose from {sorted(TARGETS)}")
        return 2
    equivalent = _equivalent()
    totals = {"killed": 0, "survived": 0, "timeout": 0, "other": 0}
    unexplained: list[str] = []
    rows = []
    for name in names or list(TARGETS):
        target = TARGETS[name]
        work, tests = _prepare(name, target)
        module = target.source.removesuffix(".py").replace("/", ".")
        globs = [f"{module}.{f}__mutmut_*" for f in target.functions]
        print(f"== {target.source}: {' '.join(tests)}", flush=True)
        start = time.monotonic()
        cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", "1", *globs]
        proc = subprocess.run(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            sys.stdout.write(proc.stdout.decode(errors="replace")[-4000:])
            print(f"mutmut failed on {target.source} (exit {proc.returncode}); see {work}")
            return proc.returncode
        codes = _verdicts(work, target)
        counts = {"killed": 0, "survived": 0, "timeout": 0, "other": 0}
        for key, code in sorted(codes.items()):
            column = (
                "killed"
                if code in KILLED
                else "survived"
                if code in SURVIVED
                else "timeout"
                if code in TIMEOUT
                else "other"
            )
            counts[column] += 1
            if column in ("survived", "other") and key not in equivalent:
                unexplained.append(f"{key} ({'survived' if code == 0 else f'exit {code}'})")
        for column, count in counts.items():
            totals[column] += count
        rows.append((target.source, counts, time.monotonic() - start))
    print(f"\n{'file':<18}{'killed':>8}{'survived':>10}{'timeout':>9}{'other':>7}{'seconds':>9}")
    for source, c, seconds in rows:
        line = f"{c['killed']:>8}{c['survived']:>10}{c['timeout']:>9}{c['other']:>7}{seconds:>9.0f}"
        print(f"{source:<18}{line}")
    # a timeout counts as killed: the mutant made the tests hang, which a run would notice
    total = sum(totals.values())
    rate = (totals["killed"] + totals["timeout"]) / max(total, 1)
    print(f"kill rate {rate:.1%} ({totals['killed'] + totals['timeout']}/{total} mutants)")
    for line in unexplained:
        print(f"not killed and not in mutate/equivalent.txt: {line}")
    if unexplained:
        print(f"see one: cd {WORK}/<target> && {sys.executable} -m mutmut show <name>")
    return 1 if unexplained or rate < TARGET_RATE else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
