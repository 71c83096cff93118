"""GGUF export: any HF Llama dir of ours as a file llama.cpp loads (F32, F16, Q8_0, Q4_0, Q5_0).

Written with the `gguf` package (llama.cpp's own gguf-py), so the container format, tensor names and
block quantizers are llama.cpp's. What its HF converter does for a Llama, done here the same way:
- q and k projections are permuted (`permute_qk`, `n_head` for q, `n_kv_head` for k): HF stores
  RoPE's rotated halves as [first halves | second halves] per head, ggml's rope wants the pairs
  interleaved;
- the tokenizer travels inside the file: SentencePiece pieces, scores and token types read from
  `tokenizer.model`, BOS/EOS/UNK ids and add_bos, so llama.cpp tokenizes exactly as we do;
- the chat template of `tokenizer_config.json` is stored verbatim as `tokenizer.chat_template` (its
  `{% generation %}` training markers included: llama.cpp's Jinja and llama-cpp-python's skip them);
- 1-D tensors (the RMSNorm weights) stay F32; a 2-D weight whose rows are not a multiple of the
  type's block size cannot be block-quantized and stays F16 (listed in the result). Every other
  2-D weight gets the type, embedding and output included (llama-quantize's `--pure`).

Lineage (MLflow run, DVC hash, ...) arrives as a plain dict and is stored as `tinyllama.lineage.*`
strings: this module knows nothing of where it came from. The file is written to a temp name and
renamed, so a crash never leaves a GGUF that looks complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.atomic import atomic_file
from model.config import LlamaConfig
from model.files import GGUF_TYPES, TOKENIZER_CONFIG_FILE, TOKENIZER_MODEL_FILE
from model.hf import config_from_hf, load_hf, read_hf_config, to_hf_state_dict
from model.tokenizer import BOS_ID, EOS_ID, UNK_ID, parse_model

EXPORT_TYPES = ("F32", *GGUF_TYPES)  # F32 too: the same bytes per weight as our fp32 engine (benchmarks)
LINEAGE_PREFIX = "tinyllama.lineage."
_PAD_SCORE = -1000.0  # what llama.cpp's converter gives [PAD] tokens beyond the SentencePiece vocab


@dataclass(frozen=True)
class GgufFile:
    path: Path
    qtype: str
    size_bytes: int
    kept_f16: tuple[str, ...]  # GGUF tensor names left F16: row length not a multiple of the block size


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order → llama.cpp's interleaved pairs, per head (its converter's `permute`).
    Rows of one head are [x_0..x_{d/2-1}, y_0..y_{d/2-1}]; ggml wants [x_0, y_0, x_1, y_1, ...]."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk` (reading a GGUF back into HF order)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _qtype(name: str):
    import gguf

    if name not in EXPORT_TYPES:
        raise ValueError(f"quant type {name!r} is not supported (supported: {', '.join(EXPORT_TYPES)})")
    return gguf.GGMLQuantizationType[name]


def _file_type(name: str):
    import gguf

    return {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
            "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0}[name]


def block_size(qtype: str) -> int:
    """Weights per quantization block (1 for F16): a row must be a multiple of it."""
    import gguf

    return gguf.GGML_QUANT_SIZES[_qtype(qtype)][0]


def gguf_tensors(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors → GGUF names (gguf-py's own Llama map), q/k permuted."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layer)
    out = {}
    for hf_name, tensor in state.items():
        if hf_name.endswith("self_attn.q_proj.weight"):
            tensor = permute_qk(tensor, config.n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            tensor = permute_qk(tensor, config.n_kv_head)
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"weights: no GGUF name for tensor {hf_name}")
        out[name] = tensor
    return out


def encode_tensor(tensor: torch.Tensor, qtype: str) -> tuple[np.ndarray, str]:
    """(bytes or floats as gguf-py wants them, the type actually used) for one tensor."""
    import gguf

    data = tensor.detach().to(torch.float32).numpy()
    if data.ndim <= 1 or qtype == "F32":
        return data, "F32"
    if data.shape[-1] % block_size(qtype):
        qtype = "F16"
    return gguf.quants.quantize(data, _qtype(qtype)), qtype


@dataclass(frozen=True)
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool


def read_vocab(directory: Path, vocab_size: int) -> Vocab:
    """The SentencePiece vocabulary of a HF dir, as llama.cpp's converter reads it (pieces, scores,
    token types); padded with unused [PADi] tokens when the model's vocab is larger."""
    import gguf

    path = Path(directory) / TOKENIZER_MODEL_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing (the GGUF embeds the SentencePiece tokenizer)")
    proto = parse_model(path.read_bytes())
    if len(proto.pieces) > vocab_size:
        raise ValueError(f"{path}: {len(proto.pieces)} pieces but config.json vocab_size is {vocab_size}")
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's piece types are gguf's TokenType values
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(_PAD_SCORE)
        types.append(int(gguf.TokenType.UNUSED))
    return Vocab(tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix))


def read_chat_template(directory: Path) -> str | None:
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path} chat_template: expected one Jinja string, got {type(template).__name__}")
    return template


def export_gguf(hf_dir: str | Path, out_path: str | Path, qtype: str, lineage: dict | None = None,
                name: str | None = None, overwrite: bool = False) -> GgufFile:
    """Write `hf_dir` as a GGUF of `qtype` at `out_path` (atomically). Errors (`ValueError`, or
    `FileExistsError` when `out_path` exists and not `overwrite`) name the file or field at fault."""
    import gguf

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    _qtype(qtype)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: exists (refusing to overwrite)")
    config = config_from_hf(read_hf_config(hf_dir))
    vocab = read_vocab(hf_dir, config.vocab_size)
    template = read_chat_template(hf_dir)
    tensors = gguf_tensors(to_hf_state_dict(load_hf(hf_dir)), config)

    with atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or hf_dir.name)
        writer.add_file_type(_file_type(qtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, config)
        _add_tokenizer(writer, vocab, template)
        for key, value in sorted((lineage or {}).items()):
            writer.add_string(LINEAGE_PREFIX + key, str(value))
        kept = []
        for tensor_name, tensor in tensors.items():
            data, used = encode_tensor(tensor, qtype)
            if used == "F16" and qtype != "F16":
                kept.append(tensor_name)
            writer.add_tensor(tensor_name, data, raw_dtype=gguf.GGMLQuantizationType[used])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GgufFile(out_path, qtype, out_path.stat().st_size, tuple(kept))


def _add_hparams(writer, config: LlamaConfig) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.mlp_dim)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)


def _add_tokenizer(writer, vocab: Vocab, template: str | None) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if template is not None:
        writer.add_chat_template(template)
