"""Stage `base_model`: materialize `model.name` once as a plain fp32 HF folder.

    python -m stages.base_model --out models/base

The source (hub id, local folder, GGUF file, or the GGUF shipped in a Python package) is loaded,
its quantizer marker cleared, and saved as safetensors + tokenizer + generation config with a
`grpo_source.json` recording where it came from, so later stages load it fast and offline.
"""

from __future__ import annotations

import logging

from grpo import config, model
from grpo.fsutil import check_writable
from stages import _cli

log = logging.getLogger(__name__)


def main(args) -> None:
    params = config.load(args.params)
    check_writable(args.out)
    source = model.resolve_source(params.model.name, params.model.revision)
    info = model.materialize(source, args.out, trust_remote_code=params.model.trust_remote_code)
    log.info("%s -> %s (%d parameters)", params.model.name, args.out, info["num_parameters"])


if __name__ == "__main__":
    p = _cli.parser(__doc__)
    p.add_argument("--out", required=True, help="output model folder")
    _cli.run("base_model", main, p.parse_args())
