"""Tests of grpo.prompts: chat messages and the SFT target of a reference solution."""

from __future__ import annotations

import doctest

import pytest
from test_gsm8k import NATALIA, THOUSANDS, WENG

import grpo.prompts
from grpo.answer_format import is_well_formed
from grpo.gsm8k import make_record
from grpo.prompts import build_messages, reasoning_text, sft_completion, strip_calculator
from grpo.rewards import grade


def test_strip_calculator_and_reasoning_text() -> None:
    assert strip_calculator(WENG["answer"]) == (
        "Weng earns 12/60 = $0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $10.\n#### 10"
    )
    assert reasoning_text(WENG["answer"]) == (
        "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10."
    )
    assert strip_calculator("no annotations") == "no annotations"
    assert reasoning_text("  just text  ") == "just text"


@pytest.mark.parametrize("row", [NATALIA, WENG, THOUSANDS])
def test_sft_completion_is_well_formed_and_correct(row: dict[str, str]) -> None:
    record = make_record("train", 0, row)
    target = sft_completion(record["solution"], record["gold"])
    assert "<<" not in target
    assert "####" not in target
    assert is_well_formed(target)
    assert is_well_formed(target + "<|im_end|>")
    assert grade(target, record["gold"]).strict_correct


def test_sft_completion_text() -> None:
    assert sft_completion(NATALIA["answer"], "72") == (
        "<reasoning>\n"
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "</reasoning>\n"
        "<answer>\n72\n</answer>"
    )


def test_build_messages() -> None:
    assert build_messages("How many?", "Respond in the format") == [
        {"role": "system", "content": "Respond in the format"},
        {"role": "user", "content": "How many?"},
    ]
    assert build_messages("How many?", "") == [{"role": "user", "content": "How many?"}]


def test_doctests() -> None:
    result = doctest.testmod(grpo.prompts)
    assert result.attempted > 0
    assert result.failed == 0
