"""Tests of grpo.rewards: number normalization, answer extraction, format checks, rewards."""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

import grpo.rewards
from grpo.data import parse_gold
from grpo.rewards import (
    TAGS,
    Graded,
    RewardFunctions,
    correctness_reward,
    extract_last_number,
    extract_tagged_answer,
    format_reward,
    grade,
    is_well_formed,
    normalize_number,
    numbers_equal,
)

HUGE = "123456789012345678901234567890123"  # 33 digits: beyond float precision
GOOD = (
    "<reasoning>\nNatalia sold 48/2 = 24 clips in May.\n48+24 = 72\n</reasoning>\n"
    "<answer>\n72\n</answer>"
)


def cfg(mode: str = "strict", weight: float = 0.8) -> SimpleNamespace:
    return SimpleNamespace(
        correct_exact=2.0, correct_numeric=1.5, format_mode=mode, format_weight=weight
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


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        (GOOD, "72", 2.0),
        ("<answer>1,080</answer>", "1,080", 2.0),
        ("<answer> 1080 </answer>", "1080", 2.0),
        ("<answer>1080</answer>", "1,080", 1.5),
        ("<answer>$1,080.00</answer>", "1080", 1.5),
        ("<answer>1080.0</answer>", "1080", 1.5),
        ("<answer>The answer is 72 clips.</answer>", "72", 1.5),
        (f"<answer>{HUGE}</answer>", HUGE, 2.0),
        (f"<answer>{HUGE[:-1]}4</answer>", HUGE, 0.0),
        ("<answer>71</answer>", "72", 0.0),
        ("<answer>72 or 73</answer>", "72", 0.0),
        ("<answer>seventy-two</answer>", "72", 0.0),
        ("<answer>...</answer>", "72", 0.0),
        ("<answer></answer>", "72", 0.0),
        ("The answer is 72.", "72", 0.0),  # untagged: no reward, only lenient eval credit
        ("<answer>72</answer><|im_end|>", "72", 2.0),
    ],
)
def test_correctness_reward(completion: str, gold: str, expected: float) -> None:
    assert correctness_reward(completion, gold) == expected


def test_correctness_reward_custom_values() -> None:
    assert correctness_reward("<answer>72</answer>", "72", exact=1.0, numeric=0.5) == 1.0
    assert correctness_reward("<answer>72.0</answer>", "72", exact=1.0, numeric=0.5) == 0.5


@pytest.mark.parametrize(
    ("completion", "presence", "strict"),
    [
        (GOOD, 0.8, 0.8),
        (GOOD + "<|im_end|>", 0.8, 0.8),
        ("", 0.0, 0.0),
        ("<answer>72</answer>", 0.4, 0.0),
        ("<reasoning>", 0.2, 0.0),
        ("<reasoning></reasoning><answer></answer>", 0.8, 0.0),  # empty tags game presence only
        ("<reasoning>r</reasoning><answer>72</answer>" * 5, 0.8, 0.0),  # repeats never exceed max
        ("".join(TAGS) * 10 + " 72", 0.8, 0.0),
        (GOOD + "\nThe answer is 72.", 0.8, 0.0),
    ],
)
def test_format_reward(completion: str, presence: float, strict: float) -> None:
    assert format_reward(completion) == pytest.approx(presence)
    assert format_reward(completion, mode="presence") == pytest.approx(presence)
    assert format_reward(completion, mode="strict") == strict
    assert format_reward(completion, mode="off") == 0.0


def test_format_reward_weight_and_bad_mode() -> None:
    assert format_reward(GOOD, mode="presence", weight=1.0) == 1.0
    assert format_reward("<answer>", mode="presence", weight=1.0) == 0.25
    assert format_reward(GOOD, mode="strict", weight=0.5) == 0.5
    with pytest.raises(ValueError, match="'presence', 'strict', 'off'"):
        format_reward(GOOD, mode="structure")


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        (GOOD, "72", Graded("72", "72", True, True, True)),
        ("The total is 1,080 dollars.", "1080", Graded(None, "1080", False, True, False)),
        (
            "<reasoning>r</reasoning><answer>71</answer> actually 72",
            "72",
            Graded("71", "72", False, True, False),
        ),
        ("<answer>72</answer> I think 73", "72", Graded("72", "73", True, True, False)),
        ("no idea", "72", Graded(None, None, False, False, False)),
        ("<answer>...</answer>", "5", Graded(None, None, False, False, False)),
    ],
)
def test_grade(completion: str, gold: str, expected: Graded) -> None:
    assert grade(completion, gold) == expected


def test_reward_functions_score_and_total() -> None:
    rewards = RewardFunctions(cfg("strict"))
    assert rewards.names == ("correctness", "format")
    assert rewards.score(GOOD, "72") == {"correctness": 2.0, "format": 0.8}
    assert rewards.total(GOOD, "72") == pytest.approx(2.8)
    assert rewards.total("72", "72") == 0.0
    assert rewards.max_total() == pytest.approx(2.8)
    presence = RewardFunctions(cfg("presence", 0.4))
    assert presence.score("<answer>1,080</answer>", "1080") == {
        "correctness": 1.5,
        "format": pytest.approx(0.2),
    }
    assert RewardFunctions(cfg("off")).score(GOOD, "72") == {"correctness": 2.0, "format": 0.0}


def test_reward_functions_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="'presence', 'strict', 'off'"):
        RewardFunctions(cfg("exact"))


def test_trl_functions() -> None:
    correctness, fmt = RewardFunctions(cfg("strict")).trl_functions()
    assert (correctness.__name__, fmt.__name__) == ("correctness_reward", "format_reward")
    completions = [
        GOOD,
        [{"role": "assistant", "content": GOOD + "<|im_end|>"}],
        [{"role": "user", "content": "<answer>72</answer>"}, {"role": "assistant", "content": "7"}],
        "<answer>1080</answer>",
    ]
    raw = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    answers = ["72", raw, "72", "1,080"]
    got = correctness(prompts=["q"] * 4, completions=completions, answer=answers, extra="ignored")
    assert got == [2.0, 2.0, 0.0, 1.5]
    assert fmt(prompts=None, completions=completions, answer=answers) == [0.8, 0.8, 0.0, 0.0]
    assert fmt(completions=[]) == []


def test_trl_correctness_needs_one_answer_per_completion() -> None:
    correctness, _ = RewardFunctions(cfg()).trl_functions()
    with pytest.raises(ValueError, match="one gold answer per completion"):
        correctness(completions=[GOOD, GOOD], answer=["72"])
    with pytest.raises(ValueError, match="one gold answer per completion"):
        correctness(completions=[GOOD])


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


@given(TEXT, st.text(max_size=10) | st.integers().map(str) | TEXT)
def test_rewards_are_bounded(completion: str, gold: str) -> None:
    graded = grade(completion, gold)
    assert graded.lenient_correct or not graded.strict_correct
    assert correctness_reward(completion, gold) in (0.0, 1.5, 2.0)
    assert 0.0 <= format_reward(completion) <= 0.8
    assert format_reward(completion, mode="strict") in (0.0, 0.8)
    assert format_reward(completion, mode="strict") <= format_reward(completion)
    for mode in ("presence", "strict", "off"):
        rewards = RewardFunctions(cfg(mode))
        assert 0.0 <= rewards.total(completion, gold) <= rewards.max_total()
        correctness, fmt = rewards.trl_functions()
        chat = [[{"role": "assistant", "content": completion}]]
        [reward] = correctness(completions=chat, answer=[gold])
        assert reward in (0.0, 1.5, 2.0)
        assert (
            fmt(completions=[completion])
            == fmt(completions=chat)
            == [rewards.score(completion, gold)["format"]]
        )


def test_doctests() -> None:
    result = doctest.testmod(grpo.rewards)
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


def test_completion_text_of_an_empty_message_list_is_empty() -> None:
    assert grpo.rewards._completion_text([]) == ""


def test_non_string_message_content_names_its_type() -> None:
    correctness, _ = RewardFunctions(cfg()).trl_functions()
    with pytest.raises(TypeError, match=r"^completion message content must be a string, got int$"):
        correctness(completions=[[{"role": "assistant", "content": 72}]], answer=["72"])


def test_trl_gold_is_the_text_after_the_last_marker() -> None:
    correctness, _ = RewardFunctions(cfg()).trl_functions()
    assert correctness(completions=["<answer>7</answer>"], answer=["a #### b #### 7"]) == [2.0]


def test_reward_functions_use_the_configured_values() -> None:
    rewards = RewardFunctions(
        SimpleNamespace(
            correct_exact=3.0, correct_numeric=1.0, format_mode="off", format_weight=0.8
        )
    )
    assert rewards.score("<answer>72</answer>", "72")["correctness"] == 3.0
    assert rewards.score("<answer>72.0</answer>", "72")["correctness"] == 1.0
    assert rewards.max_total() == 3.0  # format "off" earns nothing


def test_trl_correctness_counts_in_its_message() -> None:
    correctness, _ = RewardFunctions(cfg()).trl_functions()
    with pytest.raises(ValueError, match=r"\(answer=\.\.\.\): 2 completions, 1 answers$"):
        correctness(completions=[GOOD, GOOD], answer=["72"])
    with pytest.raises(ValueError, match=r"\(answer=\.\.\.\): 1 completions, no answers$"):
        correctness(completions=[GOOD])
