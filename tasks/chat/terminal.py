"""`tinyllama chat --model DIR|models:/tinyllama-chat@champion`: a conversation in the terminal.

Each line typed is a user turn; the reply streams as it is generated and joins the history, so
follow-up questions work. `/reset` forgets the history, `/exit` (or end of input) quits. The model
is a chat model dir, or a registry reference resolved through tasks/registry.py (downloaded once).
"""

from __future__ import annotations

import os
import sys

from tasks.errors import UserError

COMMANDS_HELP = "type a message; /reset forgets the conversation, /exit quits"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR|models:/NAME@ALIAS",
                        help="a chat model dir, or a registered version: models:/tinyllama-chat@champion, "
                             "models:/tinyllama-chat/3")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow store for models:/ references (default: $MLFLOW_TRACKING_URI, else "
                             "the local store mlflow/mlflow.db)")
    parser.add_argument("--template", default=None, metavar="NAME",
                        help="chat template for a model dir that carries none (a base milestone)")
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system message for the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--compile", action="store_true",
                        help="decode on the compiled step (model/step.py), compiled at start (on 2 CPU cores "
                             "~10-25 s with a cold inductor cache); 1.3-2x the eager rate at batch 1 on CPU")


def _template_source(directory, name: str | None) -> str:
    from model.chat import template
    from model.hf import read_chat_template

    if name is not None:
        try:
            return template(name).source
        except ValueError as exc:
            raise UserError(f"--template: {exc}") from None
    source = read_chat_template(directory)
    if source is None:
        raise UserError(f"--model: {directory} carries no chat_template (a base model?); pass --template "
                        "zephyr, chatml or llama2 to chat with it anyway")
    return source


def _load(args):
    from model.hf import load_hf
    from model.tokenizer import Tokenizer
    from tasks.registry import resolve_model
    from tasks.tracking import local_tracking_uri

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()
    directory = resolve_model(args.model, uri)
    source = _template_source(directory, args.template)
    try:
        return load_hf(directory), Tokenizer.load(directory), source
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"--model: {exc}") from None


def main(args) -> int:
    from tasks.chat.generate import check_sampling_args
    from tasks.chat.session import ChatSession

    check_sampling_args(args)
    model, tokenizer, source = _load(args)
    session = ChatSession(model, tokenizer, source, args.system, args.max_new_tokens, args.temperature,
                          args.top_p, args.top_k, args.seed, args.compile)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} ({COMMANDS_HELP})")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            continue
        if not text:
            continue
        if interactive:
            sys.stdout.write("assistant> ")
        try:
            for piece in session.reply(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as exc:
            print(f"(not sent: {exc})", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
