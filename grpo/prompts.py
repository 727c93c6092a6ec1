"""The chat prompt a question becomes: system + user turn through the model's chat template.

Owns the prompt text every stage feeds the model (SFT, GRPO rollouts, evaluation, generate), so
training and evaluation see the same prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from grpo.data import build_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str, system: str) -> str:
    """The prompt text for one question: system + user turn through the chat template."""
    return tokenizer.apply_chat_template(
        build_messages(question, system), tokenize=False, add_generation_prompt=True
    )
