"""GRPO fine-tuning of language models on GSM8K."""
