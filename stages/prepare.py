"""Stage `prepare`: download (or read a local mirror of) GSM8K and write train/eval records.

    python -m stages.prepare --out data/prepared

Writes `train.jsonl` and `eval.jsonl` (id, question, solution, gold) and `meta.json` (source,
sha256 of what was read, counts) into the output folder, atomically.
"""

from __future__ import annotations

import json
import logging

from grpo import config, gsm8k
from grpo.fsutil import atomic_dir, check_writable
from stages import _cli

log = logging.getLogger(__name__)


def main(args) -> None:
    params = config.load(args.params)
    check_writable(args.out)
    raw = gsm8k.fetch(params.data)
    train, evals, counts = gsm8k.split_records(raw, params.data)
    meta = {"source": raw.source, "sha256": raw.sha256, "notes": raw.notes, "counts": counts}
    with atomic_dir(args.out) as tmp:
        for name, records in (("train", train), ("eval", evals)):
            with open(tmp / f"{name}.jsonl", "w") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("%s -> %s: %d train, %d eval", raw.source, args.out, len(train), len(evals))


if __name__ == "__main__":
    p = _cli.parser(__doc__)
    p.add_argument("--out", required=True, help="output folder")
    _cli.run("prepare", main, p.parse_args())
