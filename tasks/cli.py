"""`tinyllama`: one CLI whose subcommands are the pipeline's stages (what dvc.yaml calls).

Only the chosen subcommand's module is imported, so `tinyllama plan` does not pay for
Ray or lm-eval. The module each command names exposes `add_arguments(parser)` and `main(args)`
(`main` finds its subcommand in `args.command`: sft and dpo are one stage module).
Bad input (`UserError`) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tasks.errors import UserError
from tasks.logs import quiet_progress_bars

COMMANDS = {
    # the stages, in the order of the DAG (dvc.yaml); each is `tasks.<package>.stage`
    "tokenizer": ("tasks.tokenizer.stage", "train or convert the tokenizer into models/tokenizer/"),
    "prepare": ("tasks.data.stage", "tokenize and pack the corpora into Parquet shards"),
    "pretrain": ("tasks.pretrain.stage", "pretrain on Ray Train, exporting milestone checkpoints"),
    "evaluate": ("tasks.evaluate.stage", "score every milestone with lm-eval, log to MLflow"),
    "sft": ("tasks.sft.stage", "supervised fine-tuning of chat variants from pretraining milestones"),
    "dpo": ("tasks.sft.stage", "DPO of the chat variants from their SFT models"),
    "quantize": ("tasks.quantize.stage", "GGUF files for llama.cpp and int8 for our engine, measured like llama.cpp"),
    "deploy": ("tasks.deploy.stage", "serve the champion on Ray Serve, check it with the openai client, stop it"),
    # tools around the stages
    "plan": ("tasks.pretrain.plan", "dry-run a profile: parameters, steps, memory per GPU, days"),
    "generate": ("tasks.chat.generate", "sample text from a checkpoint dir"),
    "chat": ("tasks.chat.terminal", "talk to a chat model (a dir or models:/tinyllama-chat@champion)"),
    "serve": ("tasks.deploy.serve", "the OpenAI-compatible server (Ray Serve) for a model dir or registry alias"),
    "publish": ("tasks.deploy.publish", "put the deployed model on shared storage and write the Serve config a "
                "cluster's replicas can run"),
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyllama", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    quiet_progress_bars()  # before the subcommand's module imports tqdm
    args = _parser(command).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"tinyllama {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
