"""`tinyllama dpo --params FILE`: DPO of every variant with a `dpo` section, from its SFT model (also the
frozen reference); writes `{paths.models}/dpo/<variant>/`, `{paths.metrics}/dpo.json` and the full
`chat_table.md` (base vs SFT vs SFT+DPO)."""

from __future__ import annotations

from tasks.pretrain.run import add_arguments  # the same flags: --params, --resume

__all__ = ["add_arguments", "main"]


def main(args) -> int:
    from tasks.sft.driver import stage_main  # after the CLI starts: its imports come under the stage's log

    return stage_main("dpo")(args)
