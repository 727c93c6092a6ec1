"""Tests of grpo.rewards: correctness and format rewards, grading, the TRL reward functions."""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_answer_format import GOOD, HUGE, TEXT

import grpo.rewards
from grpo.answer_format import TAGS
from grpo.rewards import (
    Graded,
    RewardFunctions,
    correctness_reward,
    format_reward,
    grade,
)


def cfg(mode: str = "strict", weight: float = 0.8) -> SimpleNamespace:
    return SimpleNamespace(
        correct_exact=2.0, correct_numeric=1.5, format_mode=mode, format_weight=weight
    )


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


def test_reward_functions_score() -> None:
    rewards = RewardFunctions(cfg("strict"))
    assert rewards.names == ("correctness", "format")
    assert rewards.score(GOOD, "72") == {"correctness": 2.0, "format": 0.8}
    assert rewards.score("72", "72") == {"correctness": 0.0, "format": 0.0}
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


def test_trl_correctness_counts_in_its_message() -> None:
    correctness, _ = RewardFunctions(cfg()).trl_functions()
    with pytest.raises(ValueError, match=r"\(answer=\.\.\.\): 2 completions, 1 answers$"):
        correctness(completions=[GOOD, GOOD], answer=["72"])
    with pytest.raises(ValueError, match=r"\(answer=\.\.\.\): 1 completions, no answers$"):
        correctness(completions=[GOOD])
