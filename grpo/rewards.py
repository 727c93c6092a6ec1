"""Answer parsing and rewards: one parser serves the GRPO rewards and the evaluation.

Owns how a completion is read: the tagged answer (content of the last ``<answer>`` block), the
lenient answer (last number anywhere), whether the completion is well formed, and how numbers
are compared. Numbers are normalized exactly (``decimal``-style string arithmetic and
``fractions.Fraction``, never ``float``), so "1,080", "$1,080.00" and "1080.0" are all 1080.

Rewards are pure functions, string in and float out, and never raise on any completion:

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

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

TAGS: tuple[str, ...] = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
"""The four tags of the answer format, in the order they must appear."""

FORMAT_MODES: tuple[str, ...] = ("presence", "strict", "off")
"""Valid values of ``format_reward(mode=...)`` (and of ``reward.format_mode`` in params.yaml)."""

EOS_MARKERS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>")
"""End-of-sequence strings tolerated after ``</answer>`` when special tokens were not skipped."""

PLACEHOLDER = "..."
"""The template's placeholder: an answer (or reasoning) of exactly this counts as empty."""

_REASONING_OPEN, _REASONING_CLOSE, _ANSWER_OPEN, _ANSWER_CLOSE = TAGS

# One number token. A sign counts only when it does not follow a word character or ")", so the
# hyphen in "pages 3-5" or "120-page" is not a minus. Thousands separators count only in
# well-formed groups of three ("1,080", "12,345,678"); "1,08" is the two numbers 1 and 08.
# `\d` matches every Unicode decimal digit (Arabic-Indic, full-width, ...).
_NUMBER = re.compile(
    r"""
    (?:(?<![\w)])(?P<sign>[-+\u2212]))?    # optional sign: -, + or the Unicode minus
    \$?                                    # "-$5"
    (?:
        (?P<num>\d+)/(?P<den>\d+)          # simple fraction 3/4
      | (?P<int>\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.(?P<frac>\d+))?   # 1,080.50 or 1080.5
      | (?<!\d)\.(?P<bare>\d+)             # .5
    )
    """,
    re.VERBOSE,
)

_MAX_FRACTION_DIGITS = 100
"""Fractions whose numerator or denominator is longer than this are not numbers (keeps int
conversion far below Python's int/str digit limit; plain integers and decimals have no limit)."""


def _ascii_digits(digits: str) -> str:
    """Map any Unicode decimal digits to ASCII ("١٢" -> "12")."""
    if digits.isascii():
        return digits
    return "".join(str(unicodedata.decimal(ch)) for ch in digits)


def _decimal_string(negative: bool, int_part: str, frac_part: str) -> str:
    """Canonical decimal text from ASCII digit strings: no leading/trailing zeros, no "-0"."""
    int_part = int_part.lstrip("0") or "0"
    frac_part = frac_part.rstrip("0")
    text = f"{int_part}.{frac_part}" if frac_part else int_part
    return "-" + text if negative and text != "0" else text


def _fraction_string(value: Fraction) -> str:
    """Terminating decimal text if `value` has one, else the reduced "p/q"."""
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    cut = len(scaled) - places
    return _decimal_string(value < 0, scaled[:cut], scaled[cut:])


def _canonical(match: re.Match[str]) -> str | None:
    """Canonical text of one matched number token, or None if it is not a valid number."""
    negative = match["sign"] in ("-", "\u2212")
    if match["den"] is not None:
        num, den = _ascii_digits(match["num"]), _ascii_digits(match["den"])
        if len(num) > _MAX_FRACTION_DIGITS or len(den) > _MAX_FRACTION_DIGITS or not den.strip("0"):
            return None
        value = Fraction(int(num), int(den))
        return _fraction_string(-value if negative else value)
    if match["bare"] is not None:
        return _decimal_string(negative, "0", _ascii_digits(match["bare"]))
    int_part = _ascii_digits(match["int"].replace(",", ""))
    return _decimal_string(negative, int_part, _ascii_digits(match["frac"] or ""))


def normalize_number(text: str | None) -> str | None:
    """Canonical form of the single number in `text`; None if it holds no number or several.

    Surrounding text and punctuation, "$", "%", a leading "+" and thousands separators go;
    the sign stays; decimals keep their significant digits; a simple fraction becomes a decimal
    when it terminates, else its reduced "p/q"; Unicode digits become ASCII. Number words are
    not numbers. Values stay exact at any size. Never raises on a string.

    >>> normalize_number("$1,080.00 dollars.")
    '1080'
    >>> normalize_number("0.50"), normalize_number("+7"), normalize_number("-3.0")
    ('0.5', '7', '-3')
    >>> normalize_number("3/4"), normalize_number("2/6"), normalize_number("50%")
    ('0.75', '1/3', '50')
    >>> normalize_number("١٢"), normalize_number("123456789012345678901234567890.10")
    ('12', '123456789012345678901234567890.1')
    >>> [normalize_number(t) for t in ("eighteen", "1,08", "3 + 4", None)]
    [None, None, None, None]
    """
    if not isinstance(text, str):
        return None
    matches = list(_NUMBER.finditer(text))
    if len(matches) != 1:
        return None
    return _canonical(matches[0])


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Do `a` and `b` each hold a single number, and the same one? False if either holds none.

    >>> numbers_equal("1,080", "$1080.00"), numbers_equal("0.5", "1/2"), numbers_equal("3", None)
    (True, True, False)
    """
    left, right = normalize_number(a), normalize_number(b)
    return left is not None and left == right


def extract_tagged_answer(completion: str) -> str | None:
    """Stripped content of the last complete ``<answer>...</answer>`` block.

    None when there is no complete block, or its content is empty or the placeholder "...".

    >>> extract_tagged_answer("<answer> 1 </answer> then <answer>\\n2\\n</answer>")
    '2'
    >>> extract_tagged_answer("<answer>5"), extract_tagged_answer("<answer>...</answer>")
    (None, None)
    """
    end = completion.rfind(_ANSWER_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(_ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    content = completion[start + len(_ANSWER_OPEN) : end].strip()
    if not content or content == PLACEHOLDER:
        return None
    return content


def extract_last_number(text: str) -> str | None:
    """Normalized form of the last number anywhere in `text`; None if there is none.

    >>> extract_last_number("48/2 = 24 clips, so 48 + 24 = 1,080 dollars, or -$3")
    '-3'
    >>> extract_last_number("They paid $1,080.00."), extract_last_number("no digits")
    ('1080', None)
    """
    for match in reversed(list(_NUMBER.finditer(text))):
        value = _canonical(match)
        if value is not None:
            return value
    return None


def _strip_trailing_eos(text: str) -> str:
    """`text` without trailing whitespace and EOS marker strings."""
    text = text.rstrip()
    while True:
        marker = next((m for m in EOS_MARKERS if text.endswith(m)), None)
        if marker is None:
            return text
        text = text[: -len(marker)].rstrip()


def _has_content(text: str) -> bool:
    stripped = text.strip()
    return bool(stripped) and stripped != PLACEHOLDER


def is_well_formed(completion: str) -> bool:
    """One non-empty reasoning block, then one non-empty answer block, then nothing else.

    Leading whitespace, whitespace between the blocks, and trailing whitespace or EOS marker
    strings (``EOS_MARKERS``) are allowed. Each tag appears exactly once; a block holding only
    the template placeholder "..." counts as empty.

    >>> is_well_formed("<reasoning>\\n2+2=4\\n</reasoning>\\n<answer>\\n4\\n</answer><|im_end|>")
    True
    >>> is_well_formed("<reasoning>2+2=4</reasoning><answer>4</answer> The answer is 4.")
    False
    """
    if any(completion.count(tag) != 1 for tag in TAGS):
        return False
    text = _strip_trailing_eos(completion).lstrip()
    if not (text.startswith(_REASONING_OPEN) and text.endswith(_ANSWER_CLOSE)):
        return False
    r_close = text.find(_REASONING_CLOSE)
    a_open = text.find(_ANSWER_OPEN)
    if not len(_REASONING_OPEN) <= r_close < a_open:
        return False
    reasoning = text[len(_REASONING_OPEN) : r_close]
    between = text[r_close + len(_REASONING_CLOSE) : a_open]
    answer = text[a_open + len(_ANSWER_OPEN) : -len(_ANSWER_CLOSE)]
    return _has_content(reasoning) and not between.strip() and _has_content(answer)


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

    def total(self, completion: str, gold: str) -> float:
        """The sum of the components."""
        return sum(self.score(completion, gold).values())

    def max_total(self) -> float:
        """The largest total a completion can earn."""
        format_max = 0.0 if self.format_mode == "off" else self.format_weight
        return max(self.correct_exact, self.correct_numeric) + format_max

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
