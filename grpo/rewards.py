"""Rewards and grading: pure functions of a completion and a gold answer, on `grpo.answer_format`.

One reading of a completion serves the GRPO rewards and the evaluation (`grade`). Rewards are
string in, float out, and never raise on any completion:

- correctness (tutorial scheme): ``exact`` when the tagged answer string equals the gold string,
  ``numeric`` when it is the same number written differently, else 0;
- format: ``presence`` gives weight/4 per tag present (the tutorial; gameable by writing the four
  tags anywhere), ``strict`` gives the full weight only to a well-formed completion (one reasoning
  block, then one answer block, then nothing but whitespace or an EOS marker), ``off`` gives 0.

>>> completion = "<reasoning>\\n48/2 = 24, 48+24 = 72\\n</reasoning>\\n<answer>\\n72\\n</answer>"
>>> graded = grade(completion, "72")
>>> graded.strict_answer, graded.strict_correct, graded.well_formed
('72', True, True)
>>> correctness_reward(completion, "72"), format_reward(completion, mode="strict")
(2.0, 0.8)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grpo.answer_format import (
    TAGS,
    extract_last_number,
    extract_tagged_answer,
    is_well_formed,
    numbers_equal,
)

FORMAT_MODES: tuple[str, ...] = ("presence", "strict", "off")
"""Valid values of ``format_reward(mode=...)`` (and of ``reward.format_mode`` in params.yaml)."""


@dataclass(frozen=True)
class Graded:
    """How one completion reads against a gold answer (the evaluation's view)."""

    strict_answer: str | None
    """The tagged answer (`extract_tagged_answer`)."""
    lenient_answer: str | None
    """The last number anywhere in the completion (`extract_last_number`)."""
    strict_correct: bool
    """The tagged answer is numerically equal to the gold answer."""
    lenient_correct: bool
    """Strictly correct, or the last number equals the gold answer."""
    well_formed: bool
    """The completion has the exact format (`is_well_formed`)."""


def grade(completion: str, gold: str) -> Graded:
    """Grade `completion` against `gold`, strictly (tagged answer) and leniently (last number).

    >>> g = grade("The total is 1,080 dollars.", "1080")
    >>> g.strict_correct, g.lenient_correct, g.well_formed
    (False, True, False)
    """
    strict_answer = extract_tagged_answer(completion)
    lenient_answer = extract_last_number(completion)
    strict_correct = numbers_equal(strict_answer, gold)
    return Graded(
        strict_answer=strict_answer,
        lenient_answer=lenient_answer,
        strict_correct=strict_correct,
        lenient_correct=strict_correct or numbers_equal(lenient_answer, gold),
        well_formed=is_well_formed(completion),
    )


def correctness_reward(
    completion: str, gold: str, *, exact: float = 2.0, numeric: float = 1.5
) -> float:
    """`exact` if the tagged answer is the gold string, `numeric` if the same number, else 0.

    >>> [correctness_reward(f"<answer>{a}</answer>", "1080") for a in ("1080", "$1,080", "1081")]
    [2.0, 1.5, 0.0]
    """
    answer = extract_tagged_answer(completion)
    if answer is None:
        return 0.0
    if answer == gold.strip():
        return exact
    if numbers_equal(answer, gold):
        return numeric
    return 0.0


def format_reward(completion: str, *, mode: str = "presence", weight: float = 0.8) -> float:
    """Format reward: weight/4 per tag present ("presence"), weight if well formed ("strict").

    >>> format_reward("<answer>4</answer>"), format_reward("<answer>4</answer>", mode="strict")
    (0.4, 0.0)
    >>> format_reward("x", mode="shape")
    Traceback (most recent call last):
    ...
    ValueError: format mode 'shape' is not one of 'presence', 'strict', 'off'
    """
    if mode == "presence":
        return weight / len(TAGS) * sum(tag in completion for tag in TAGS)
    if mode == "strict":
        return weight if is_well_formed(completion) else 0.0
    if mode == "off":
        return 0.0
    valid = ", ".join(repr(m) for m in FORMAT_MODES)
    raise ValueError(f"format mode {mode!r} is not one of {valid}")


def _completion_text(item: str | Sequence[Mapping[str, Any]]) -> str:
    """Text of a completion: the string itself, or the last message's content (TRL chat format)."""
    if isinstance(item, str):
        return item
    if not item:
        return ""
    content = item[-1]["content"]
    if not isinstance(content, str):
        raise TypeError(
            f"completion message content must be a string, got {type(content).__name__}"
        )
    return content


def _gold_text(answer: str) -> str:
    """A gold answer, accepting raw GSM8K answers: the text after the last "####", stripped."""
    return answer.rsplit("####", 1)[-1].strip()


class RewardFunctions:
    """The configured reward components, as plain functions and as TRL reward functions.

    Built from a reward config with attributes ``correct_exact``, ``correct_numeric``,
    ``format_mode`` and ``format_weight`` (duck-typed).

    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(correct_exact=2.0, correct_numeric=1.5, format_mode="strict",
    ...                       format_weight=0.8)
    >>> rewards = RewardFunctions(cfg)
    >>> rewards.score("<reasoning>6*3</reasoning>\\n<answer>$18</answer>", "18")
    {'correctness': 1.5, 'format': 0.8}
    >>> correctness, fmt = rewards.trl_functions()
    >>> correctness.__name__, fmt.__name__
    ('correctness_reward', 'format_reward')
    >>> correctness(completions=[[{"role": "assistant", "content": "<answer>18</answer>"}]],
    ...             answer=["6 * 3 = <<6*3=18>>18\\n#### 18"])
    [2.0]
    """

    names: tuple[str, ...] = ("correctness", "format")

    def __init__(self, cfg: Any) -> None:
        self.correct_exact = float(cfg.correct_exact)
        self.correct_numeric = float(cfg.correct_numeric)
        self.format_mode = str(cfg.format_mode)
        self.format_weight = float(cfg.format_weight)
        format_reward("", mode=self.format_mode, weight=self.format_weight)  # validates the mode

    def _correctness(self, completion: str, gold: str) -> float:
        return correctness_reward(
            completion, gold, exact=self.correct_exact, numeric=self.correct_numeric
        )

    def _format(self, completion: str) -> float:
        return format_reward(completion, mode=self.format_mode, weight=self.format_weight)

    def score(self, completion: str, gold: str) -> dict[str, float]:
        """Each component's reward, keyed by `names`."""
        return {
            "correctness": self._correctness(completion, gold),
            "format": self._format(completion),
        }

    def trl_functions(self) -> list[Callable[..., list[float]]]:
        """Reward functions in TRL's calling convention, named for TRL's logs.

        Each is ``f(prompts=None, completions=..., answer=..., **kwargs) -> list[float]``; a
        completion is a string or a list of chat messages (the last one's content is used), and
        `answer` holds gold strings or raw GSM8K answers ("... #### 72").
        """

        def correctness(
            prompts: Any = None,
            completions: Sequence[Any] = (),
            answer: Sequence[str] | None = None,
            **kwargs: Any,
        ) -> list[float]:
            if answer is None or len(answer) != len(completions):
                got = "no" if answer is None else len(answer)
                raise ValueError(
                    f"correctness_reward needs one gold answer per completion "
                    f"(answer=...): {len(completions)} completions, {got} answers"
                )
            return [
                self._correctness(_completion_text(c), _gold_text(a))
                for c, a in zip(completions, answer, strict=True)
            ]

        def fmt(prompts: Any = None, completions: Sequence[Any] = (), **kwargs: Any) -> list[float]:
            return [self._format(_completion_text(c)) for c in completions]

        for func, name in ((correctness, "correctness_reward"), (fmt, "format_reward")):
            func.__name__ = func.__qualname__ = name
        return [correctness, fmt]
