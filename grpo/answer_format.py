"""The answer format, spelled once: its tags, reading answers and numbers, well-formedness.

Owns the four tags (``<reasoning>``, ``</reasoning>``, ``<answer>``, ``</answer>``) and the
template's placeholder, how a completion is read (the tagged answer: content of the last
``<answer>`` block; the lenient answer: last number anywhere), whether a completion is well
formed, and how numbers are compared. Numbers are normalized exactly (``decimal``-style string
arithmetic and ``fractions.Fraction``, never ``float``), so "1,080", "$1,080.00" and "1080.0" are
all 1080. Every function is pure and never raises on a string.

>>> completion = tagged_completion("48/2 = 24, 48+24 = 72", "72")
>>> print(completion)
<reasoning>
48/2 = 24, 48+24 = 72
</reasoning>
<answer>
72
</answer>
>>> extract_tagged_answer(completion), is_well_formed(completion)
('72', True)
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

TAGS: tuple[str, ...] = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
"""The four tags of the answer format, in the order they must appear."""

REASONING_OPEN, REASONING_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = TAGS

EOS_MARKERS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>")
"""End-of-sequence strings tolerated after ``</answer>`` when special tokens were not skipped."""

PLACEHOLDER = "..."
"""The template's placeholder: an answer (or reasoning) of exactly this counts as empty."""


def tagged_completion(reasoning: str, answer: str) -> str:
    """A well-formed completion: the reasoning block, then the answer block, one tag a line."""
    return (
        f"{REASONING_OPEN}\n{reasoning}\n{REASONING_CLOSE}\n{ANSWER_OPEN}\n{answer}\n{ANSWER_CLOSE}"
    )


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
    end = completion.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    content = completion[start + len(ANSWER_OPEN) : end].strip()
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
    if not (text.startswith(REASONING_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    r_close = text.find(REASONING_CLOSE)
    a_open = text.find(ANSWER_OPEN)
    if not len(REASONING_OPEN) <= r_close < a_open:
        return False
    reasoning = text[len(REASONING_OPEN) : r_close]
    between = text[r_close + len(REASONING_CLOSE) : a_open]
    answer = text[a_open + len(ANSWER_OPEN) : -len(ANSWER_CLOSE)]
    return _has_content(reasoning) and not between.strip() and _has_content(answer)
