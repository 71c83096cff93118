"""`tinyllama sft --params FILE`: supervised fine-tuning of each `sft.variants` entry from its base
milestone; writes `{paths.models}/sft/<variant>/`, `{paths.metrics}/sft.json` and `sft_table.md`.
Takes pretraining's flags (`--params`, `--resume auto|never`): the same loop, the same resume."""

from __future__ import annotations

from tasks.pretrain.run import add_arguments  # the same flags: --params, --resume

__all__ = ["add_arguments", "main"]


def main(args) -> int:
    from tasks.sft.driver import stage_main  # after the CLI starts: its imports come under the stage's log

    return stage_main("sft")(args)
