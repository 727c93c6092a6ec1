"""The lean decode loop and its steps: our own generation, the same tokens as `model.generate`.

`loop` owns `decode` (prefill once per prompt, finished rows leave, stop when none is left);
`packed_prefill` the llama/qwen2 prefill without padding; `llama` the llama/qwen2 decode step
(torch, or the C kernel of `grpo.kernels`); `hf_steps` the steps of any other architecture
through its HF forward.
"""

from grpo.decoding.loop import decode

__all__ = ["decode"]
