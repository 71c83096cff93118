"""`tinyllama tokenizer`: train or convert the tokenizer into `{paths.models}/tokenizer/`.

- `tokenizer.kind: train` trains a SentencePiece BPE with Llama 2's trainer settings on the text of
  `tokenizer.train_sources` (every `data.sources` entry when the list is empty). Each source gets a
  share of `tokenizer.max_sentences` proportional to its `weight`, so the tokenizer sees the mix
  pretraining will see, not whichever source happens to come first.
- `tokenizer.kind: pretrained` converts `tokenizer.model_file` (e.g. Llama 2's `tokenizer.model`).

Everything is checked, and the tokenizer built in memory, before anything is written; the dir
then appears in one rename (`model.tokenizer.save_tokenizer_dir`).
"""

from __future__ import annotations

from pathlib import Path

from tasks.errors import UserError
from tasks.layout import Layout
from tasks.params import Params, add_params_argument, load_params


def add_arguments(parser) -> None:
    add_params_argument(parser)


def main(args) -> int:
    from model.tokenizer import Tokenizer
    from tasks.logs import stage_log

    params = load_params(args.params)
    with stage_log("tokenizer", params):
        out = build_tokenizer(params)
        tokenizer = Tokenizer.load(out)
        print(f"tokenizer: {out} (vocab {tokenizer.vocab_size}, sha256 {tokenizer.sha256[:16]})")
    return 0


def build_tokenizer(params: Params) -> Path:
    """Train or convert per `params.tokenizer`; returns the written dir."""
    from model.tokenizer import save_tokenizer_dir

    if params.tokenizer.kind == "pretrained":
        model_bytes = _pretrained(params)
    else:
        model_bytes = _trained(params)
    return save_tokenizer_dir(model_bytes, Layout.from_params(params).tokenizer_dir)


def _pretrained(params: Params) -> bytes:
    from model.tokenizer import parse_model
    from tasks.remote_inputs import read_input_file

    path = params.tokenizer.model_file  # a local path or a URI (s3://…) every node reaches
    model_bytes = read_input_file(path, "tokenizer.model_file")
    try:
        pieces = len(parse_model(model_bytes).pieces)
    except ValueError as exc:
        raise UserError(f"tokenizer.model_file: {path}: {exc}") from None
    if pieces != params.tokenizer.vocab_size:
        raise UserError(f"tokenizer.vocab_size: {params.tokenizer.vocab_size} does not match "
                        f"tokenizer.model_file {path} ({pieces} pieces)")
    model_vocab = params.llama_config().vocab_size
    if model_vocab != pieces:
        field = "model.overrides.vocab_size" if "vocab_size" in params.model.overrides else "model.preset"
        raise UserError(f"{field}: the model's vocab_size is {model_vocab} (preset {params.model.preset!r}) but "
                        f"tokenizer.model_file {path} has {pieces} pieces; set model.overrides.vocab_size: {pieces}")
    return model_bytes


def _trained(params: Params) -> bytes:
    from model.tokenizer import sentences, train_sentencepiece
    from tasks.data.sources import iter_documents

    spec = params.tokenizer
    fixed = params.model.overrides.get("vocab_size")
    if fixed is not None and fixed != spec.vocab_size:
        raise UserError(f"model.overrides.vocab_size: {fixed} differs from tokenizer.vocab_size {spec.vocab_size}")
    quotas = _quotas(params)
    lines = [line for source, quota in quotas for line in sentences(iter_documents(source, params), quota)]
    if not lines:
        names = [source.name for source, _ in quotas]
        raise UserError(f"tokenizer.train_sources: {names} contain no text")
    try:
        return train_sentencepiece(lines, spec.vocab_size, seed=params.seed)
    except ValueError as exc:
        raise UserError(f"tokenizer.vocab_size: {exc}") from None


def _quotas(params: Params) -> list[tuple]:
    """(source, sentences it may contribute): `max_sentences` split by weight, at least one each."""
    names = params.tokenizer.train_sources or [s.name for s in params.data.sources]
    by_name = {s.name: s for s in params.data.sources}
    chosen = [by_name[name] for name in names]
    total = sum(s.weight for s in chosen)
    return [(s, max(1, int(params.tokenizer.max_sentences * s.weight / total))) for s in chosen]
