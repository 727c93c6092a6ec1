"""Compare the experiments of this repo: headline per run, seeds, paired tests (not a stage).

    python -m stages.compare                          # every run of `dvc exp show`
    python -m stages.compare --a baseline --b lr2e5   # one paired test: config of B vs of A
    python -m stages.compare --png metrics/compare.png

Prints, for the workspace (unless it is a copy of a run), the baseline commit and each `dvc exp`
experiment: the params that differ from the baseline and strict / lenient / format accuracy of
each evaluated model with 95% intervals, and grpo − base. Runs that differ only in seed keys
form a config: per config, the mean ± sd across seeds. Then a paired test of each config against
the baseline's config (or `--b` against `--a`, each a config label or an experiment name): the
runs with the same seeds are paired and their per-question strict outcomes of `--model` pooled
(exact McNemar, and a seeded bootstrap interval of the difference). See `grpo.compare`.
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path

from grpo import compare
from grpo.errors import UserError
from grpo.experiments import exp_show, parse_exp_show, read_predictions
from grpo.fsutil import check_writable
from stages import _cli


def main(args: argparse.Namespace) -> None:
    root = Path(args.repo)
    if args.from_json:
        try:
            rows = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(
                f"{args.from_json}: cannot read ({err}); save `dvc exp show --json`"
            ) from err
    else:
        rows = exp_show(root)
    runs = parse_exp_show(rows)
    if not runs:
        raise UserError(f"{root}: no runs in `dvc exp show`; run `dvc repro` or `dvc exp run`")
    if args.png:
        check_writable(args.png)
    print("\n".join(compare.headline(runs)))
    configs = compare.group_configs(runs)
    if any(len(c.runs) > 1 for c in configs) or len(configs) > 1:
        print("Configs (runs that differ only in seed keys): mean ± sd across seeds (runs)")
        print("\n".join(compare.seed_table(configs)), end="\n\n")
    if args.a or args.b:
        if not (args.a and args.b):
            raise UserError("--a and --b go together: name both configs (or experiments)")
        pairs = [(compare.pick_config(configs, args.a), compare.pick_config(configs, args.b))]
    else:
        base = next((c for c in configs if c.label == "baseline"), None)
        pairs = [(base, c) for c in configs if base is not None and c is not base]
    read = partial(read_predictions, root)
    results, unmatched = [], []
    for a, b in pairs:
        r = compare.paired_test(a, b, read, args.model, boot=args.boot, seed=args.boot_seed)
        (results if r else unmatched).append(r or f"{a.label} → {b.label}")
    if results:
        print(
            f"Paired tests ({args.model}, strict accuracy, per question, runs paired by equal "
            f"seeds, {args.boot} bootstrap resamples of questions, seed {args.boot_seed})"
        )
        print("\n".join(compare.paired_table(results)))
    for name in unmatched:
        print(f"{name}: no runs with the same seeds; not tested")
    if args.png:
        compare.plot(configs, results, Path(args.png))
        logging.info("wrote %s", args.png)


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repo", default=".", help="DVC repo root (default: .)")
    p.add_argument("--a", help="reference config: its label, or an experiment of it")
    p.add_argument("--b", help="config compared with --a: its label, or an experiment of it")
    p.add_argument("--model", default=compare.FINAL, help="model of the paired test (grpo)")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (2000)")
    p.add_argument("--boot-seed", type=int, default=0, help="bootstrap seed (0)")
    p.add_argument("--png", help="write the comparison figure here")
    p.add_argument("--from-json", help="read this saved `dvc exp show --json` output instead")
    _cli.run("compare", main, p.parse_args())
