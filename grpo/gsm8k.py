"""GSM8K: fetch it from the Hugging Face hub or a local mirror, validate it, split it into records.

Owns where the data comes from: the hub dataset (`data.hub_id`, `data.hub_config`) when it can be
reached, else the first existing folder of `data.mirrors` holding the official `train.jsonl` and
`test.jsonl`. The provenance (source, sha256 of what was read, row counts) travels with the output.

Owns what a valid GSM8K row is (a non-empty string `question`, asked once per split, and an
`answer` whose text after the last "####" is a number) and the prepared record format
``{"id", "question", "solution", "gold"}`` (ids unique). Bad rows raise `DataError`, whose
one-line message names the file and line (or the dataset and row) and the fix.

Eval records come only from the official test split, train records only from the train split;
train questions that also occur in the test split are dropped so they can never leak into eval.

>>> row = {"question": " Natalia sold 48 clips in April and half as many in May. Total? ",
...        "answer": "In May: 48/2 = <<48/2=24>>24\\nTotal: 48+24 = <<48+24=72>>72\\n#### 72"}
>>> record = make_record("train", 3, row)
>>> record["id"], record["question"][:14], record["gold"]
('train-00003', 'Natalia sold 4', '72')
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo.answer_format import normalize_number
from grpo.config import DataConfig
from grpo.fsutil import DataError, json_lines, sha256_file, short_repr
from grpo.hub import hub_unreachable

SPLITS = ("train", "test")


def parse_gold(answer: str) -> str:
    """The normalized number after the last "####" of a GSM8K answer.

    >>> parse_gold("48+24 = <<48+24=72>>72\\n#### 1,080")
    '1080'
    >>> parse_gold("#### abc")
    Traceback (most recent call last):
    ...
    ValueError: gold answer 'abc' is not a number
    """
    if "####" not in answer:
        raise ValueError("no '####' before the final answer")
    tail = answer.rsplit("####", 1)[1].strip()
    gold = normalize_number(tail)
    if gold is None:
        raise ValueError(f"gold answer {short_repr(tail)} is not a number")
    return gold


def _check_row(row: Any, where: str, fix: str) -> dict[str, str]:
    """{"question", "answer"} of one raw row; DataError naming `where` if it is not valid."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}; {fix}")
    for key in ("question", "answer"):
        if key not in row:
            raise DataError(f"{where}: missing '{key}'; {fix}")
        if not isinstance(row[key], str):
            kind = type(row[key]).__name__
            raise DataError(f"{where}: '{key}' must be a string, got {kind}; {fix}")
        if not row[key].strip():
            raise DataError(f"{where}: '{key}' is empty; {fix}")
    try:
        parse_gold(row["answer"])
    except ValueError as err:
        raise DataError(f"{where}: {err} in 'answer'; {fix}") from err
    return {"question": row["question"], "answer": row["answer"]}


def _check_rows(
    numbered: Iterable[tuple[int, Any]], prefix: str, unit: str, verb: str
) -> list[dict[str, str]]:
    """Valid rows of (position, raw row) pairs, no question asked twice.

    A DataError names `prefix` + the position, e.g. "train.jsonl:3" (unit "line", verb "remove")
    or "hub/train: row 3" (unit "row", verb "drop").
    """
    rows, first = [], {}
    for position, raw in numbered:
        row = _check_row(raw, f"{prefix}{position}", f"fix or {verb} the {unit}")
        question = row["question"].strip()
        if question in first:
            raise DataError(
                f"{prefix}{position}: duplicate of {unit} {first[question]} (same question); "
                f"{verb} one of them"
            )
        first[question] = position
        rows.append(row)
    return rows


def read_gsm8k_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Validated rows {"question", "answer"} of an official-format GSM8K JSONL file.

    Blank lines are skipped and extra keys ignored; any bad line, or a file without rows, raises
    `DataError` naming the file and line.
    """
    path = Path(path)
    rows = _check_rows(json_lines(path), f"{path}:", "line", "remove")
    if not rows:
        raise DataError(
            f"{path}: no rows; write one JSON object {{question, answer}} per line, or point "
            f"data.mirrors at the official files"
        )
    return rows


def validate_rows(rows: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, str]]:
    """Validated rows {"question", "answer"} from another source (e.g. the Hugging Face hub).

    >>> validate_rows([{"question": "1+1?", "answer": "#### 2"}, {"question": "?"}], "hub/train")
    Traceback (most recent call last):
    ...
    grpo.fsutil.DataError: hub/train: row 1: missing 'answer'; fix or drop the row
    """
    checked = _check_rows(enumerate(rows), f"{source}: row ", "row", "drop")
    if not checked:
        raise DataError(f"{source}: no rows; check the dataset name, config and split")
    return checked


def make_record(split: str, index: int, row: Mapping[str, str]) -> dict[str, str]:
    """The prepared record of row `index` of `split`: id, stripped question, solution, gold."""
    return {
        "id": f"{split}-{index:05d}",
        "question": row["question"].strip(),
        "solution": row["answer"],
        "gold": parse_gold(row["answer"]),
    }


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
