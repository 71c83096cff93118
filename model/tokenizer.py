"""The tokenizer: Llama 2's SentencePiece BPE, trained here or converted, encoded by HF `tokenizers`.

Why two libraries: SentencePiece is the reference. Its trainer is what Llama 2 used, and its
`tokenizer.model` is what llama.cpp's converter reads. HF `tokenizers` encodes in Rust, in
batches, and is what `transformers.AutoTokenizer` loads. `hf_backend` rebuilds the SentencePiece
model in HF form so the two give the same ids (tests check Llama 2's ids and llama.cpp's vectors).

Two details decide that agreement:
- merges are ranked by piece *score*, not by id: Llama 2 gives its whitespace-only pieces
  (`▁▁`, `▁▁▁`) score -1e9 but low ids, so rank-by-id would merge `▁▁Hello` into `▁▁|Hello`
  where SentencePiece gives `▁|▁Hello`;
- the dummy prefix comes from a `Prepend("▁")` normalizer, not from a `Metaspace` pre-tokenizer,
  because `Metaspace` adds no prefix to text that already starts with a space (` Hello` would lose
  its leading `▁`). This is why the dir declares `PreTrainedTokenizerFast` rather than
  `LlamaTokenizer`: transformers 5 rebuilds a `LlamaTokenizer` with `Metaspace`, which breaks that case.

This module knows nothing of params or stages: callers pass plain values and get `ValueError`s.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from model.atomic import atomic_dir
from model.files import SPECIAL_TOKENS_FILE, TOKENIZER_JSON_FILE, TOKENIZER_MODEL_FILE

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB = 3 + 256
"""unk, bos, eos and one piece per byte (byte fallback): a smaller vocab cannot encode every string."""


MAX_SENTENCE_BYTES = 1 << 16
"""Longest line handed to the trainer (SentencePiece silently drops longer ones)."""

_MAX_SENTENCE_CHARS = MAX_SENTENCE_BYTES // 4  # UTF-8 needs at most 4 bytes per character

LLAMA2_TRAINER = dict(
    model_type="bpe",
    character_coverage=0.99995,
    byte_fallback=True,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
)
"""Llama 2's trainer_spec / normalizer_spec (read from its tokenizer.model), minus the corpus knobs."""

_REPRODUCIBLE = dict(
    input_sentence_size=0,          # the caller caps the sentences: no random sampling
    shuffle_input_sentence=False,
    num_threads=1,                  # threads change the bytes written into trainer_spec
    max_sentence_length=MAX_SENTENCE_BYTES,
    minloglevel=2,                  # keep the trainer's per-step log off the stage's output
)


def sentences(texts: Iterable[str], max_sentences: int | None = None) -> list[str]:
    """Documents → the trainer's sentences: one per non-empty line, the first `max_sentences`.

    Lines, because Llama 2 never learned a newline piece (`\\n` is byte `<0x0A>`); a line longer
    than the trainer accepts is cut at a space so its words still count.
    """
    out: list[str] = []
    for text in texts:
        for line in text.split("\n"):
            for piece in _cut(line):
                if piece.strip():
                    out.append(piece)
                    if max_sentences is not None and len(out) >= max_sentences:
                        return out
    return out


def _cut(line: str) -> Iterator[str]:
    while len(line) > _MAX_SENTENCE_CHARS:
        cut = line.rfind(" ", 1, _MAX_SENTENCE_CHARS)
        cut = _MAX_SENTENCE_CHARS if cut <= 0 else cut
        yield line[:cut]
        line = line[cut:]
    yield line


def train_sentencepiece(texts: Iterable[str], vocab_size: int, seed: int = 0,
                        max_sentences: int | None = None) -> bytes:
    """Train a Llama-2-style SentencePiece BPE on `texts` (split by `sentences`, capped at
    `max_sentences` when given); returns the `tokenizer.model` bytes.

    Deterministic: the same texts, vocab size and seed give byte-identical output.
    """
    import sentencepiece as spm

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab size {vocab_size} is below {MIN_VOCAB} (unk, bos, eos and 256 byte-fallback pieces)")
    lines = sentences(texts, max_sentences)
    if not lines:
        raise ValueError("no training text (every document is empty)")
    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer, vocab_size=vocab_size,
                                       **LLAMA2_TRAINER, **_REPRODUCIBLE)
    except RuntimeError as exc:
        raise ValueError(_trainer_message(str(exc), vocab_size)) from None
    return writer.getvalue()


def _trainer_message(message: str, vocab_size: int) -> str:
    """SentencePiece's check failures ('... ] Vocabulary size too high (5000). Please set it to a value
    <= 391.') as one readable line."""
    reason = message.split("] ", 1)[-1].splitlines()[0]
    if "smaller than required_chars" in reason:
        needed = reason.split(" vs ")[-1].split(".")[0]
        return (f"vocab size {vocab_size} is too small: byte fallback and the characters of the training "
                f"text need at least {needed}")
    if "too high" in reason:
        return f"vocab size {vocab_size} is more than the training text supports ({reason})"
    return reason


def parse_model(model_bytes: bytes):
    """The SentencePiece ModelProto, checked to be a model `hf_backend` reproduces exactly."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as exc:  # protobuf raises its own DecodeError, not a ValueError
        raise ValueError(f"not a SentencePiece model ({exc})") from None
    if not proto.pieces:
        raise ValueError("not a SentencePiece model (no pieces)")
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    checks = {
        "model_type": (trainer.ModelType.Name(trainer.model_type), "BPE"),
        "byte_fallback": (trainer.byte_fallback, True),
        "unk_id/bos_id/eos_id": ((trainer.unk_id, trainer.bos_id, trainer.eos_id), (UNK_ID, BOS_ID, EOS_ID)),
        "normalizer": (normalizer.name if not normalizer.precompiled_charsmap else "precompiled", "identity"),
        "add_dummy_prefix": (normalizer.add_dummy_prefix, True),
        "remove_extra_whitespaces": (normalizer.remove_extra_whitespaces, False),
        "user_defined/unused pieces": (sum(p.type in (p.USER_DEFINED, p.UNUSED) for p in proto.pieces), 0),
    }
    for name, (got, want) in checks.items():
        if got != want:
            raise ValueError(f"not a Llama-2-style SentencePiece BPE: {name} is {got}, expected {want}")
    return proto


def hf_backend(model_bytes: bytes):
    """The `tokenizers.Tokenizer` that encodes exactly like SentencePiece with this model."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    proto = parse_model(model_bytes)
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    merges = generate_merges(vocab, {piece.piece: piece.score for piece in proto.pieces})
    spec = proto.trainer_spec
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=spec.unk_piece, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p in (spec.unk_piece, spec.bos_piece, spec.eos_piece)])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{spec.bos_piece} $A", pair=f"{spec.bos_piece} $A {spec.bos_piece} $B",
        special_tokens=[(spec.bos_piece, BOS_ID)])
    return backend


def save_tokenizer_dir(model_bytes: bytes, out_dir: str | Path) -> Path:
    """Write the HF tokenizer dir (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    tokenizer.model) atomically: built in a sibling temp dir, then renamed over `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    backend = hf_backend(model_bytes)
    spec = parse_model(model_bytes).trainer_spec
    special = {"bos_token": spec.bos_piece, "eos_token": spec.eos_piece, "unk_token": spec.unk_piece}
    with atomic_dir(out_dir) as tmp:
        PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                **special).save_pretrained(tmp)
        (tmp / TOKENIZER_MODEL_FILE).write_bytes(model_bytes)
        (tmp / SPECIAL_TOKENS_FILE).write_text(json.dumps(special, indent=2) + "\n")
    return Path(out_dir)


class Tokenizer:
    """What every stage encodes with: the HF backend of a tokenizer dir plus its identity (`sha256`).

    Text is always text: `<s>` written in a document encodes as the characters `<`, `s`, `>`
    (as SentencePiece does), so corpus content can never inject a BOS/EOS; those come only from
    `bos=`/`eos=`. The one exception is `encode_chat`, for text a chat template rendered.
    """

    def __init__(self, backend, model_bytes: bytes):
        proto = parse_model(model_bytes)
        if backend.get_vocab_size() != len(proto.pieces):
            raise ValueError(f"{TOKENIZER_JSON_FILE} has {backend.get_vocab_size()} tokens but {TOKENIZER_MODEL_FILE} "
                             f"has {len(proto.pieces)} pieces")
        backend.encode_special_tokens = True
        self._backend = backend
        self.vocab_size = len(proto.pieces)
        self.unk_id, self.bos_id, self.eos_id = UNK_ID, BOS_ID, EOS_ID
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()

    def __setstate__(self, state: dict) -> None:
        """Unpickling (process pools, Ray) rebuilds the backend without `encode_special_tokens`."""
        self.__dict__.update(state)
        self._backend.encode_special_tokens = True

    @functools.cached_property
    def _chat_backend(self):
        """The same tokenizer, but matching `<s>`/`</s>` in text as BOS/EOS, as transformers does."""
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(self._backend.to_str())
        backend.encode_special_tokens = False
        return backend

    @functools.cached_property
    def byte_ids(self) -> frozenset[int]:
        """The byte-fallback pieces `<0x00>`..`<0xFF>`: a run of them is one UTF-8 sequence, text only
        once it ends."""
        return frozenset(i for piece, i in self._backend.get_vocab().items()
                         if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"))

    def encode_chat(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets) of text a chat template rendered, exactly as transformers'
        `tokenizer(text)` encodes it: the `<s>`/`</s>` the template wrote are BOS/EOS, and BOS comes
        first, added unless the text starts with it (the Llama 2 template writes its own; adding
        another would be transformers' known double-BOS). BOS first because pretraining put it
        before every document. Offsets are (0, 0) for an added BOS."""
        encoding = self._chat_backend.encode(text, add_special_tokens=False)
        ids, offsets = list(encoding.ids), list(encoding.offsets)
        if not ids or ids[0] != self.bos_id:
            ids, offsets = [self.bos_id] + ids, [(0, 0)] + offsets
        return ids, offsets

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        directory = Path(directory)
        for name in (TOKENIZER_MODEL_FILE, TOKENIZER_JSON_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"tokenizer dir {directory}: {name} not found")
        return cls(Backend.from_file(str(directory / TOKENIZER_JSON_FILE)),
                   (directory / TOKENIZER_MODEL_FILE).read_bytes())

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._wrap(self._backend.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Many texts at once, in parallel inside the Rust backend (no offsets computed)."""
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token: int) -> bytes:
        """What one token stands for in text, as bytes: a byte piece's byte (`<0xE2>`: one byte of a UTF-8
        sequence), a piece's UTF-8 with its `▁` as spaces, a special token's own name (`</s>`)."""
        piece = self._backend.id_to_token(int(token))
        if piece is None:
            raise ValueError(f"token id {token} outside the vocabulary (size {self.vocab_size})")
        if int(token) in self.byte_ids:
            return bytes([int(piece[3:5], 16)])
        return piece.encode() if int(token) in (self.unk_id, self.bos_id, self.eos_id) else \
            piece.replace("\u2581", " ").encode()

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + ids + [self.eos_id] * eos if bos or eos else ids
