"""`tinyllama generate`: sample text from a checkpoint dir (a HF Llama dir with its tokenizer files).

A user-facing smoke test of any milestone or chat variant: the dir is loaded exactly as
evaluation and serving load it (model/hf.py, model/tokenizer.py), and the completion is
streamed to stdout as it is decoded. `--draft DIR` decodes greedily with speculative decoding
(same output as without, fewer target passes).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="HF Llama dir (config.json, "
                        "model.safetensors, tokenizer files), e.g. models/pretrain/1M")
    parser.add_argument("--prompt", required=True, metavar="TEXT")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95, metavar="P")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="fixes the sample")
    parser.add_argument("--draft", default=None, metavar="DIR",
                        help="a smaller HF Llama dir with the same vocabulary: speculative decoding (greedy only)")
    parser.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens drafted per round")


def check_sampling_args(args) -> None:
    """The sampling flags `generate` and `chat` share, checked before any model is loaded."""
    from model.sampling import Sampling

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens: must be >= 0, got {args.max_new_tokens}")
    try:
        Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)  # the one set of rules
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise UserError(f"--{field.replace('_', '-')}: {message}") from None


def _check_args(args) -> None:
    check_sampling_args(args)
    if args.draft is not None and args.temperature != 0:
        raise UserError(f"--temperature: speculative decoding (--draft) is greedy only; use 0, got {args.temperature}")
    if args.draft_tokens < 1:
        raise UserError(f"--draft-tokens: must be >= 1, got {args.draft_tokens}")


def _load_model(flag: str, directory: str):
    from model.hf import load_hf

    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"{flag}: not a directory: {path}")
    try:
        return load_hf(path)
    except ValueError as exc:
        raise UserError(f"{flag}: {exc}") from None


def _load_tokenizer(directory: str, vocab_size: int):
    from model.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.load(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"--model: {exc}") from None
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"--model: tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's "
                        f"vocab_size {vocab_size}")
    return tokenizer


def main(args) -> int:
    from model.generate import generate_stream, speculative_stream
    from model.textstream import TextStream

    _check_args(args)
    model = _load_model("--model", args.model)
    tokenizer = _load_tokenizer(args.model, model.config.vocab_size)
    prompt = tokenizer.encode(args.prompt, bos=True)
    if len(prompt) >= model.config.max_seq_len:
        raise UserError(f"--prompt: {len(prompt)} tokens leave no room in the model's "
                        f"max_seq_len={model.config.max_seq_len}")
    if args.draft is not None:
        draft = _load_model("--draft", args.draft)
        if draft.config.vocab_size != model.config.vocab_size:
            raise UserError(f"--draft: vocab_size {draft.config.vocab_size} differs from the model's "
                            f"{model.config.vocab_size}")
        stream = speculative_stream(model, draft, prompt, args.max_new_tokens, args.draft_tokens,
                                    eos_id=tokenizer.eos_id)
    else:
        stream = generate_stream(model, prompt, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                 args.seed, eos_id=tokenizer.eos_id)
    sys.stdout.write(args.prompt)
    text = TextStream(tokenizer, prompt)
    for token in stream:
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
    sys.stdout.write(text.finish() + "\n")
    return 0
