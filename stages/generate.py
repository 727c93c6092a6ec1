"""Try a model on your own question, with the same prompt format as training and evaluation.

    python -m stages.generate --model models/grpo "A pen costs $2. How much do 5 pens cost?"

Greedy by default (`--temperature` to sample); prints the completion and the extracted answers.
The system prompt comes from params.yaml (`prompt.system`) unless `--system` is given. Runs on the
device `grpo.device` picks (a GPU when CUDA is available, in bf16 where that is native).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpo import config, device, model
from grpo.answer_format import extract_last_number, extract_tagged_answer
from grpo.errors import UserError
from grpo.generation import generate, generation_config
from grpo.prompts import chat_prompt
from grpo.sampling import Sampling, row_seeds

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _check_args(args: argparse.Namespace) -> None:
    """Fail at once on arguments that cannot work, before any model is loaded."""
    if args.max_new_tokens < 1:
        raise UserError(
            f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}; set it to 1 or more"
        )
    folder = Path(args.model)
    if not folder.exists():
        raise UserError(
            f"--model {folder}: no such folder; use a local model folder such as models/grpo"
        )
    if not folder.is_dir():
        raise UserError(
            f"--model {folder}: is a file, not a folder; use a model folder such as models/grpo"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        hint = (
            "a training checkpoint has weights but no tokenizer; use models/grpo (the final model)"
            if any(folder.glob("*.safetensors"))
            else "use a complete model folder such as models/grpo"
        )
        raise UserError(
            f"--model {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); {hint}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("question", nargs="+", help="one or more questions")
    p.add_argument("--model", default="models/grpo", help="model folder (default: models/grpo)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--system", default=None, help="system prompt (default: prompt.system)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        _check_args(args)
        system = args.system if args.system is not None else config.load(args.params).prompt.system
        lm, tokenizer, eos_ids = model.load_folder(args.model, target=device.pick_device())
    except UserError as err:
        print(f"error [generate]: {err}", file=sys.stderr)
        return 2
    cfg = generation_config(
        max_new_tokens=args.max_new_tokens,
        eos_ids=eos_ids,
        pad_id=tokenizer.pad_token_id,
    )
    prompts = [chat_prompt(tokenizer, q, system) for q in args.question]
    gen = generate(
        lm,
        tokenizer,
        prompts,
        cfg,
        sampling=Sampling(temperature=args.temperature),
        seeds=row_seeds(args.seed, 0, range(len(prompts))),
    )
    for question, text in zip(args.question, gen.texts, strict=True):
        print(f"Q: {question}\n{text}")
        tagged, last = extract_tagged_answer(text), extract_last_number(text)
        print(f"-> answer: {tagged}  (last number: {last})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
