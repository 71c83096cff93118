"""`tinyllama sft --params FILE`: supervised fine-tuning of each `sft.variants` entry from its base
milestone; writes `{paths.models}/sft/<variant>/`, `{paths.metrics}/sft.json` and `sft_table.md`.
Takes pretraining's flags (`--params`, `--resume auto|never`): the same loop, the same resume."""

from __future__ import annotations

from tasks.params import load_params
from tasks.pretrain.run import add_arguments

__all__ = ["add_arguments", "main"]


def main(args) -> int:
    from tasks.sft.driver import run_stage

    from tasks.logs import stage_log

    params = load_params(args.params)
    with stage_log("sft", params):
        run_stage(params, "sft", resume=args.resume)
    return 0
