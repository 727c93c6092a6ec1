"""Question-level comparison of two evaluated models: which questions flipped, and McNemar.

Owns the join of two predictions files on question id (different question sets are a one-line
`UserError`), the questions each model got right that the other got wrong, and the exact
McNemar test of that imbalance. No torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from grpo.errors import UserError
from grpo.eval_results import FIX, by_id
from grpo.stats import mcnemar_p


def flips(
    pred_a: Sequence[Mapping[str, Any]],
    pred_b: Sequence[Mapping[str, Any]],
    key: str = "strict_correct",
    *,
    names: tuple[str, str] = ("a", "b"),
) -> dict[str, Any]:
    """Questions whose `key` changed from model a to model b, joined on question id.

    Ids are listed in the order of `pred_a`; `mcnemar_p` tests whether the two models differ.
    Different id sets (or a repeated id) are a UserError; `names` label the models in it.

    >>> a = [{"id": "q1", "ok": False}, {"id": "q2", "ok": True}, {"id": "q3", "ok": False}]
    >>> b = [{"id": "q3", "ok": True}, {"id": "q2", "ok": False}, {"id": "q1", "ok": True}]
    >>> f = flips(a, b, key="ok")
    >>> f["wrong_to_right"], f["right_to_wrong"], f["n_wrong_to_right"], f["n_right_to_wrong"]
    (['q1', 'q3'], ['q2'], 2, 1)
    """
    a, b = by_id(pred_a, key, names[0]), by_id(pred_b, key, names[1])
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        example = (only_a or only_b)[0]
        raise UserError(
            f"predictions of {names[0]} and {names[1]} cover different questions "
            f"({len(only_a)} only in {names[0]}, {len(only_b)} only in {names[1]}, "
            f"e.g. {example}); evaluate both on the same eval set ({FIX})"
        )
    up = [qid for qid in a if not a[qid] and b[qid]]
    down = [qid for qid in a if a[qid] and not b[qid]]
    return {
        "key": key,
        "n": len(a),
        "wrong_to_right": up,
        "right_to_wrong": down,
        "n_wrong_to_right": len(up),
        "n_right_to_wrong": len(down),
        "both_right": sum(a[qid] and b[qid] for qid in a),
        "both_wrong": sum(not a[qid] and not b[qid] for qid in a),
        "mcnemar_p": mcnemar_p(len(up), len(down)),
    }


def flip_pairs(labels: Sequence[str], baseline: str) -> list[tuple[str, str]]:
    """Consecutive models, then baseline → last model when that is not already listed.

    >>> flip_pairs(["base", "sft", "grpo"], "base")
    [('base', 'sft'), ('sft', 'grpo'), ('base', 'grpo')]
    >>> flip_pairs(["base", "grpo"], "base")
    [('base', 'grpo')]
    """
    pairs = list(itertools.pairwise(labels))
    last = (baseline, labels[-1])
    if baseline != labels[-1] and last not in pairs:
        pairs.append(last)
    return pairs
