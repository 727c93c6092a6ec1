"""Tests of grpo.answer_format: number normalization, answer extraction, well-formedness."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import grpo.answer_format
from grpo.answer_format import (
    TAGS,
    extract_last_number,
    extract_tagged_answer,
    is_well_formed,
    normalize_number,
    numbers_equal,
    tagged_completion,
)
from grpo.gsm8k import parse_gold

REPO = Path(__file__).resolve().parents[1]

HUGE = "123456789012345678901234567890123"  # 33 digits: beyond float precision
GOOD = (
    "<reasoning>\nNatalia sold 48/2 = 24 clips in May.\n48+24 = 72\n</reasoning>\n"
    "<answer>\n72\n</answer>"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72", "72"),
        ("  72\n", "72"),
        ("1,080", "1080"),
        ("1080", "1080"),
        ("$1080.00", "1080"),
        ("1080.0", "1080"),
        ("$1,080.00 dollars.", "1080"),
        ("12,345,678", "12345678"),
        ("109,200,000", "109200000"),
        ("The answer is 18.", "18"),
        ("She earned $10.", "10"),
        ("50%", "50"),
        ("+7", "7"),
        ("-3", "-3"),
        ("-$5", "-5"),
        ("\u22124", "-4"),
        ("-0", "0"),
        ("-0.00", "0"),
        ("0.50", "0.5"),
        ("2.5", "2.5"),
        (".5", "0.5"),
        ("007", "7"),
        ("3/4", "0.75"),
        ("1/8", "0.125"),
        ("10/4", "2.5"),
        ("-2/4", "-0.5"),
        ("1/3", "1/3"),
        ("2/6", "1/3"),
        ("-1/3", "-1/3"),
        ("0/5", "0"),
        (HUGE, HUGE),
        (f"{HUGE}.000", HUGE),
        ("123,456,789,012,345,678,901,234,567,890", "123456789012345678901234567890"),
        ("0.000000000000000000000000000001", "0.000000000000000000000000000001"),
        ("\u0661\u0662", "12"),  # Arabic-Indic digits
        ("\uff11\uff18", "18"),  # full-width digits
        ("120-page book", "120"),
        # no number, several numbers, or not a number
        ("eighteen", None),
        ("", None),
        ("   ", None),
        ("...", None),
        ("$", None),
        ("1,08", None),
        ("1,0800", None),
        ("1,234,56", None),
        ("3 + 4 = 7", None),
        ("pages 3-5", None),
        ("1 1/2", None),
        ("5/0", None),
        (None, None),
    ],
)
def test_normalize_number(text: str | None, expected: str | None) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("1,080", "1080", True),
        ("$1080.00", "1080", True),
        ("1080.0", "1,080", True),
        ("$1,080", "1080.00", True),
        ("0.5", "1/2", True),
        ("-3", "\u22123", True),
        ("\u0661\u0662", "12", True),
        (HUGE, HUGE + ".0", True),
        (HUGE, HUGE[:-1] + "4", False),  # differs only past float precision
        ("1/3", "0.3333333333", False),
        ("1,08", "108", False),
        ("-3", "3", False),
        ("eighteen", "18", False),
        (None, "18", False),
        ("18", None, False),
        (None, None, False),
        ("", "", False),
    ],
)
def test_numbers_equal(a: str | None, b: str | None, equal: bool) -> None:
    assert numbers_equal(a, b) is equal
    assert numbers_equal(b, a) is equal


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (GOOD, "72"),
        ("<answer> $1,080 </answer>", "$1,080"),
        ("<answer>1</answer> no wait <answer>2</answer>", "2"),
        ("<answer>\n-3\n</answer><|im_end|>", "-3"),
        ("<answer>one</answer>", "one"),
        ("<answer>7", None),  # no closing tag
        ("7</answer>", None),  # no opening tag
        ("</answer>7<answer>", None),  # wrong order
        ("The answer is 72.", None),  # no tags
        ("<answer></answer>", None),
        ("<answer>  \n </answer>", None),
        ("<answer>...</answer>", None),  # the template's placeholder
        ("<answer>\n...\n</answer>", None),
        ("<answer><answer>5</answer>", "5"),  # nested: the innermost complete block
        ("", None),
    ],
)
def test_extract_tagged_answer(completion: str, expected: str | None) -> None:
    assert extract_tagged_answer(completion) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips in May. 48+24 = 72 clips altogether.", "72"),
        ("Weng earned 0.2 x 50 = $10.", "10"),
        ("So the total is 1,080", "1080"),
        ("So the total is $1,080.00.", "1080"),
        ("It dropped to -3 degrees", "-3"),
        ("from 5 to 10-3", "3"),
        ("each gets 2.5 pies", "2.5"),
        ("costs $4", "4"),
        ("1,08", "8"),
        (f"huge: {HUGE}", HUGE),
        ("<answer>72</answer><|im_end|>", "72"),
        ("eighteen apples", None),
        ("", None),
    ],
)
def test_extract_last_number(text: str, expected: str | None) -> None:
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    ("completion", "ok"),
    [
        (GOOD, True),
        ("\n  " + GOOD + "\n\n", True),
        (GOOD + "<|im_end|>", True),
        (GOOD + "\n<|endoftext|>", True),
        (GOOD + "</s>", True),
        (GOOD + "<|im_end|>\n<|endoftext|>\n", True),
        ("<reasoning>r</reasoning><answer>a</answer>", True),
        (GOOD + "\nSo the answer is 72.", False),  # text after </answer>
        (GOOD + "<|im_end|>more", False),
        ("Sure! " + GOOD, False),  # text before <reasoning>
        ("The answer is 72.", False),  # no tags
        ("<answer>72</answer>", False),  # no reasoning block
        ("<reasoning>r</reasoning>", False),  # no answer block
        ("<reasoning></reasoning>\n<answer>72</answer>", False),  # empty reasoning
        ("<reasoning>r</reasoning>\n<answer>  </answer>", False),  # empty answer
        ("<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>", False),  # template copied
        ("<reasoning>r</reasoning> x <answer>72</answer>", False),  # text between blocks
        ("<answer>72</answer>\n<reasoning>r</reasoning>", False),  # wrong order
        ("<reasoning>r<answer>72</answer></reasoning>", False),  # nested
        ("<reasoning>r</reasoning><answer>1</answer><answer>2</answer>", False),  # two answers
        ("<reasoning>r</reasoning><reasoning>s</reasoning><answer>2</answer>", False),
        ("<reasoning>r</answer></reasoning><answer>2</answer>", False),  # stray tag
        ("<reasoning>r</reasoning><answer>2", False),  # unclosed
        ("", False),
    ],
)
def test_is_well_formed(completion: str, ok: bool) -> None:
    assert is_well_formed(completion) is ok


# Property tests: arbitrary text, plus text built from the pieces the parser looks at.
PIECES = st.sampled_from(
    [
        *TAGS,
        *("...", "<|im_end|>", "</s>", "####", "eighteen", "1,080", "1,08", HUGE, "\u0661"),
        *("$", "-", "\u2212", "+", ",", ".", "/", "%", "<", ">", "\n", " ", "0", "7"),
    ]
)
NUMBER = st.from_regex(
    r"[-+\u2212]?\$?[0-9\u0661\uff11]{1,40}(,[0-9]{3}){0,3}(\.[0-9]{0,40})?(/[0-9]{1,120})?%?",
    fullmatch=True,
)
"""Number-like text: signs, "$", Unicode digits, thousands separators, decimals, fractions
(some longer than the fraction digit limit), "%"."""
HUGE_NUMBER = st.builds(
    lambda digits, n, tail: digits * n + tail,
    st.sampled_from(["9", "1,000", "0", "\u0661"]),
    st.integers(1, 6000),  # beyond Python's 4,300-digit int/str conversion limit
    st.sampled_from(["", ".5", "/3", "/" + "7" * 5000, "e99999", "####", ",0"]),
)
NESTED = st.recursive(
    st.text(max_size=4) | NUMBER | PIECES,
    lambda inner: (
        st.tuples(st.sampled_from(["reasoning", "answer"]), inner).map(
            lambda t: f"<{t[0]}>{t[1]}</{t[0]}>"
        )
        | st.lists(inner, max_size=3).map("".join)
    ),
    max_leaves=12,
)
"""Tags inside tags, unclosed, repeated, with numbers and '####' fragments in between."""
TEXT = (
    st.text()
    | st.lists(PIECES | st.text(max_size=3) | NUMBER, max_size=30).map("".join)
    | HUGE_NUMBER
    | NESTED
)


@given(TEXT)
def test_parsers_never_raise(text: str) -> None:
    normalize_number(text)
    extract_tagged_answer(text)
    extract_last_number(text)
    is_well_formed(text)
    try:
        gold = parse_gold(text)  # the GSM8K answer parser: a ValueError is its only failure
    except ValueError as err:
        assert "\n" not in str(err)
    else:
        assert normalize_number(gold) == gold


@given(TEXT)
def test_normalize_number_is_idempotent(text: str) -> None:
    value = normalize_number(text)
    assert normalize_number(value) == value
    if value is not None:
        assert numbers_equal(value, text)


@given(TEXT)
def test_extracted_numbers_are_canonical(text: str) -> None:
    for value in (extract_last_number(text), normalize_number(extract_tagged_answer(text))):
        if value is not None:
            assert normalize_number(value) == value


@given(st.integers())
def test_integers_round_trip_in_any_spelling(n: int) -> None:
    plain = str(n)
    assert normalize_number(plain) == plain
    assert normalize_number(f"{n:,}") == plain
    assert normalize_number(f"{plain}.000") == plain
    assert numbers_equal(f"${n:,}.00", plain)


def test_tagged_completion_is_the_well_formed_layout() -> None:
    completion = tagged_completion("48/2 = 24", "1,080")
    assert completion == "<reasoning>\n48/2 = 24\n</reasoning>\n<answer>\n1,080\n</answer>"
    assert is_well_formed(completion)
    assert extract_tagged_answer(completion) == "1,080"


def test_doctests() -> None:
    result = doctest.testmod(grpo.answer_format)
    assert result.attempted > 0
    assert result.failed == 0


# Edges found by `make mutate` (mutate/run.py): each case kills a mutant the cases above let live.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1/5", "0.2"),  # a factor 5 in the denominator
        ("1/25", "0.04"),  # two of them
        ("1/20", "0.05"),  # a leading zero after the point
        # 1 / (2 * 5**30): exact only in integer arithmetic (5**30 > 2**53)
        ("1/1862645149230957031250", "0.000000000000000000000536870912"),
        ("-.5", "-0.5"),  # a signed bare decimal
        ("1" * 101 + "/2", None),  # numerator past the fraction digit limit
        ("2" * 100 + "/2", "1" * 100),  # numerator at the limit
        ("5/" + "0" * 99 + "1", "5"),  # denominator at the limit (leading zeros count)
    ],
)
def test_normalize_number_edges(text: str, expected: str | None) -> None:
    assert normalize_number(text) == expected


def test_tagged_answer_ignores_an_opening_tag_after_the_last_block() -> None:
    assert extract_tagged_answer("<answer>5</answer><answer>") == "5"


def test_answer_block_inside_the_reasoning_is_not_well_formed() -> None:
    assert not is_well_formed("<reasoning>r<answer>72</reasoning></answer>")
