"""Stage `sft`: supervised format warm-up of `models/base` into `models/sft`.

    python -m stages.sft --model models/base --data data/prepared/train.jsonl --out models/sft

With `sft.enabled: false` the base model is copied unchanged (marked by `sft.json`, so the
`evaluate` stage does not evaluate the same weights twice), and `train` always starts from
`models/sft` (the tutorial's configuration turns the warm-up off). Trains on the device
`grpo.device` picks (a GPU when CUDA is available).
"""

from __future__ import annotations

import json
import logging
import shutil

from grpo import config, device, model, preflight, schema
from grpo.fsutil import atomic_dir, check_writable, read_jsonl
from grpo.sft import train_sft
from stages import _cli

log = logging.getLogger(__name__)


def main(args) -> None:
    params = config.load(args.params)
    check_writable(args.out)
    if not params.sft.enabled:
        model.check_model_dir(args.model)
        with atomic_dir(args.out) as tmp:
            shutil.copytree(args.model, tmp, dirs_exist_ok=True)
            marker = {"enabled": False, "copy_of": args.model}
            (tmp / model.SFT_FILE).write_text(json.dumps(marker) + "\n")
        log.info("sft disabled: %s copied to %s", args.model, args.out)
        return
    preflight.check_sft(params, args.model)
    records = read_jsonl(args.data, strings=("question", "solution", "gold"))
    if params.sft.num_examples > len(records):  # fewer would silently change the experiment
        raise schema.ConfigError(
            f"params.yaml: sft.num_examples: {params.sft.num_examples} exceeds the "
            f"{len(records)} records in {args.data}; set it to at most {len(records)} or raise "
            f"data.train_size"
        )
    target = device.pick_device()
    lm, tokenizer, eos_ids = model.load_folder(
        args.model,
        dtype="float32",  # fp32 master weights; bf16 autocast where bf16 is native
        attn_implementation=params.model.attn_implementation,
        trust_remote_code=params.model.trust_remote_code,
        target=target,
    )
    log.info("sft on %s", device.describe(target))
    losses = train_sft(
        lm, tokenizer, records, params.sft, system=params.prompt.system, eos_id=eos_ids[0]
    )
    model.save_model_atomic(
        lm, tokenizer, args.out, extra={"enabled": True, "losses": losses, "from": args.model}
    )


if __name__ == "__main__":
    p = _cli.parser(__doc__)
    p.add_argument("--model", required=True, help="starting model folder")
    p.add_argument("--data", required=True, help="prepared train records (jsonl)")
    p.add_argument("--out", required=True, help="output model folder")
    _cli.run("sft", main, p.parse_args())
