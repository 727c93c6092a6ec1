"""What the model is given and taught: chat messages and prompts, and SFT targets.

Owns the prompt text every stage feeds the model (SFT, GRPO rollouts, evaluation, generate), so
training and evaluation see the same prompt, and the SFT target a GSM8K reference solution
becomes: its worked steps without calculator annotations, in the answer format.

>>> solution = "In May: 48/2 = <<48/2=24>>24\\nTotal: 48+24 = <<48+24=72>>72\\n#### 72"
>>> print(sft_completion(solution, "72"))
<reasoning>
In May: 48/2 = 24
Total: 48+24 = 72
</reasoning>
<answer>
72
</answer>
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from grpo.answer_format import tagged_completion

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_CALCULATOR = re.compile(r"<<[^<>\n]*>>")


def build_messages(question: str, system: str) -> list[dict[str, str]]:
    """Chat messages for a question: the system prompt (omitted when "") then the user turn.

    >>> build_messages("2+2?", "")
    [{'role': 'user', 'content': '2+2?'}]
    """
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": question}]


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str, system: str) -> str:
    """The prompt text for one question: system + user turn through the chat template."""
    return tokenizer.apply_chat_template(
        build_messages(question, system), tokenize=False, add_generation_prompt=True
    )


def strip_calculator(solution: str) -> str:
    """`solution` without GSM8K calculator annotations.

    >>> strip_calculator("48/2 = <<48/2=24>>24 clips")
    '48/2 = 24 clips'
    """
    return _CALCULATOR.sub("", solution)


def reasoning_text(solution: str) -> str:
    """The worked solution without annotations and without the final "#### x" line.

    >>> reasoning_text("12/60 = $<<12/60=0.2>>0.2 per minute.\\n#### 10")
    '12/60 = $0.2 per minute.'
    """
    return strip_calculator(solution).rsplit("####", 1)[0].strip()


def sft_completion(solution: str, gold: str) -> str:
    """The SFT target for a reference solution, in the answer format (the caller appends EOS)."""
    return tagged_completion(reasoning_text(solution), gold)
