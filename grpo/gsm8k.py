"""Fetch GSM8K from the Hugging Face hub or a local mirror, and split it into train/eval records.

Owns where the data comes from: the hub dataset (`data.hub_id`, `data.hub_config`) when it can be
reached, else the first existing folder of `data.mirrors` holding the official `train.jsonl` and
`test.jsonl`. The provenance (source, sha256 of what was read, row counts) travels with the output.
Eval records come only from the official test split, train records only from the train split;
train questions that also occur in the test split are dropped so they can never leak into eval.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo.config import DataConfig
from grpo.data import DataError, make_record, read_gsm8k_jsonl, sha256_file, validate_rows
from grpo.hub import hub_unreachable

SPLITS = ("train", "test")


@dataclass
class RawGSM8K:
    """The two official splits as validated rows, and where they came from."""

    rows: dict[str, list[dict[str, str]]]
    source: str
    sha256: dict[str, str]
    notes: list[str] = field(default_factory=list)


def _rows_sha256(rows: list[dict[str, str]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        line = json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n"
        digest.update(line.encode())
    return digest.hexdigest()


def _from_hub(hub_id: str, hub_config: str) -> RawGSM8K:
    import datasets  # heavy import, only when the hub is used

    name = f"{hub_id}[{hub_config}]"
    loaded = datasets.load_dataset(hub_id, hub_config)
    rows = {s: validate_rows(loaded[s], f"{name}/{s}") for s in SPLITS}
    return RawGSM8K(
        rows=rows,
        source=f"hub:{name}",
        sha256={s: _rows_sha256(rows[s]) for s in SPLITS},
        notes=["sha256 over the rows as JSON lines {question, answer}"],
    )


def _from_mirror(folder: Path) -> RawGSM8K:
    rows = {s: read_gsm8k_jsonl(folder / f"{s}.jsonl") for s in SPLITS}
    return RawGSM8K(
        rows=rows,
        source=f"mirror:{folder.resolve()}",
        sha256={s: sha256_file(folder / f"{s}.jsonl") for s in SPLITS},
        notes=["sha256 of the files read"],
    )


def resolve_mirror(mirror: str, cwd: Path | None = None) -> Path:
    """A mirror folder; a relative one is relative to the project folder.

    A queued DVC experiment runs in a copy of the project at `<project>/.dvc/tmp/exps/<run>`,
    where `../shared/...` would point inside `.dvc`: there the path is taken from the project.
    """
    path = Path(mirror).expanduser()
    if path.is_absolute():
        return path
    here = (cwd or Path.cwd()).resolve()
    for parent in here.parents:
        if parent.name == "exps" and parent.parent.parts[-2:] == (".dvc", "tmp"):
            return (parent.parent.parent.parent / path).resolve()
    return (here / path).resolve()


def fetch(cfg: DataConfig) -> RawGSM8K:
    """The hub when reachable, else the first mirror folder that exists."""
    notes: list[str] = []
    hub_id, hub_config, mirrors = cfg.hub_id, cfg.hub_config, cfg.mirrors
    if hub_id:
        why = hub_unreachable()
        if why is None:
            try:
                return _from_hub(hub_id, hub_config)
            except OSError as err:  # ConnectionError, missing dataset, HTTP errors
                why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        notes.append(f"hub not used: {why}")
    for mirror in mirrors:
        folder = resolve_mirror(mirror)
        if folder.is_dir():
            raw = _from_mirror(folder)
            raw.notes = notes + raw.notes
            return raw
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        notes.append(f"mirror {mirror} {what}")
    raise DataError(
        f"params.yaml: data: no GSM8K source ({'; '.join(notes) or 'no hub_id and no mirrors'}); "
        f"connect to the hub or add a folder with train.jsonl/test.jsonl to data.mirrors"
    )


def split_records(raw: RawGSM8K, cfg: DataConfig) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(train records, eval records, counts) from the official splits, seeded by `data.seed`."""
    test_rows = raw.rows["test"]
    eval_n = len(test_rows) if cfg.eval_size is None else cfg.eval_size
    if eval_n > len(test_rows):
        raise DataError(
            f"params.yaml: data.eval_size: {eval_n} exceeds the {len(test_rows)} test problems "
            f"of {raw.source}; set it to at most {len(test_rows)} or null"
        )
    eval_idx = sorted(random.Random(cfg.seed).sample(range(len(test_rows)), eval_n))
    eval_records = [make_record("test", i, test_rows[i]) for i in eval_idx]

    test_questions = {r["question"].strip() for r in test_rows}
    train_rows = raw.rows["train"]
    order = list(range(len(train_rows)))
    random.Random(cfg.seed).shuffle(order)
    kept = [i for i in order if train_rows[i]["question"].strip() not in test_questions]
    dropped = len(order) - len(kept)
    if not kept:
        raise DataError(
            f"{raw.source}: all {dropped} train questions also occur in the test split, so no "
            f"train problem is left; check that train.jsonl holds the official train split"
        )
    if cfg.train_size is not None:
        if cfg.train_size > len(kept):
            raise DataError(
                f"params.yaml: data.train_size: {cfg.train_size} exceeds the {len(kept)} "
                f"train problems of {raw.source} ({dropped} dropped as test questions); "
                f"set it to at most {len(kept)} or null"
            )
        kept = kept[: cfg.train_size]
    train_records = [make_record("train", i, train_rows[i]) for i in kept]
    counts = {
        "train_rows_read": len(train_rows),
        "test_rows_read": len(test_rows),
        "train_dropped_overlapping_test": dropped,
        "train": len(train_records),
        "eval": len(eval_records),
    }
    return train_records, eval_records, counts
