"""Hugging Face Llama directories: our checkpoints are HF dirs, and HF dirs are our checkpoints.

Why this file exists instead of `save_pretrained`: model/ must not depend on transformers at
runtime (serving and training only need torch + safetensors), and a checkpoint must be written
atomically (a crash mid-export never leaves a half-written milestone that evaluation trusts).
The layout is exactly what `transformers.LlamaForCausalLM.save_pretrained` writes, so
`AutoModelForCausalLM.from_pretrained(dir)` loads it and gives our logits.

Weights are read with safetensors only (never pickle): a checkpoint is data, not code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.atomic import atomic_dir
from model.config import LlamaConfig
from model.files import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
)
from model.llama import Llama

BOS_ID, EOS_ID = 1, 2
_HF_PREFIX = "model."
_IGNORED_HF_KEYS = ("rotary_emb.inv_freq",)  # buffers some old exports carry; we recompute them
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def config_to_hf(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json transformers 5.x writes for this architecture, plus the legacy keys
    (`rope_theta`, `torch_dtype`) older readers such as llama.cpp's converter look for."""
    dtype_name = _DTYPE_NAMES[dtype]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "rope_theta": config.rope_base,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def _rope_base(hf: dict) -> float:
    """RoPE base from either config schema; scaled RoPE variants (llama3, yarn, ...) are refused."""
    for field in ("rope_parameters", "rope_scaling"):
        rope = hf.get(field)
        if rope:
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                raise ValueError(f"config.json {field}.rope_type: {kind!r} is not supported (only 'default' RoPE)")
            if "rope_theta" in rope:
                return float(rope["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def config_from_hf(hf: dict) -> LlamaConfig:
    """A LlamaConfig from a HF config.json dict; anything our architecture can't represent is an error
    naming the config.json field, never silently dropped."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"config.json model_type: {hf.get('model_type')!r} is not 'llama'")
    for field, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                            ("pretraining_tp", 1)):
        if field in hf and hf[field] != expected:
            raise ValueError(f"config.json {field}: {hf[field]!r} is not supported (expected {expected!r})")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if field not in hf:
            raise ValueError(f"config.json {field}: required field is missing")
    config = LlamaConfig(
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        dim=hf["hidden_size"],
        mlp_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_base=_rope_base(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != config.head_dim:
        raise ValueError(f"config.json head_dim: {head_dim} is not hidden_size / num_attention_heads = "
                         f"{config.head_dim}")
    return config


def to_hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """Our parameters under HF names (a rename). Tied embeddings are stored once, as HF does."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        hf_name = name if name == "lm_head.weight" else _HF_PREFIX + name
        state[hf_name] = tensor.detach().to("cpu").contiguous()
    return state


def from_hf_state_dict(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """HF names → ours; every expected tensor present with the expected shape, nothing unknown."""
    ours = {}
    for hf_name, tensor in state.items():
        if hf_name.endswith(_IGNORED_HF_KEYS):
            continue
        ours[hf_name.removeprefix(_HF_PREFIX)] = tensor
    if config.tie_embeddings:
        ours.pop("lm_head.weight", None)
    with torch.device("meta"):
        reference = Llama(config)
    expected = {name: tuple(p.shape) for name, p in reference.state_dict().items()
                if not (config.tie_embeddings and name == "lm_head.weight")}
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ValueError(f"weights: missing tensor {_HF_PREFIX if missing[0] != 'lm_head.weight' else ''}{missing[0]}"
                         f" ({len(missing)} missing)")
    unexpected = sorted(set(ours) - set(expected))
    if unexpected:
        raise ValueError(f"weights: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected)")
    for name, shape in expected.items():
        if tuple(ours[name].shape) != shape:
            raise ValueError(f"weights: {name} has shape {tuple(ours[name].shape)}, config.json implies {shape}")
    return ours


def _weight_files(directory: Path) -> list[Path]:
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (directory / shard).is_file():
                raise ValueError(f"{directory / shard}: shard named in {WEIGHTS_INDEX_FILE} is missing")
        return [directory / shard for shard in shards]
    raise ValueError(f"{single}: missing (no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}; "
                     "only safetensors weights are loaded)")


def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def read_chat_template(directory: str | Path) -> str | None:
    """The Jinja chat template a chat model dir carries (tokenizer_config.json), None for a base model."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("chat_template")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def load_hf(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama:
    """Load a HF Llama dir (ours or one saved by transformers; single file or sharded) from safetensors."""
    directory = Path(directory)
    config = config_from_hf(read_hf_config(directory))
    state = {}
    for file in _weight_files(directory):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in from_hf_state_dict(state, config).items()}
    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict(state, strict=not config.tie_embeddings, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_rope(device)
    return model.eval()


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    found = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not found:
        raise ValueError(f"tokenizer_dir: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")
    for name in found:
        shutil.copyfile(tokenizer_dir / name, out / name)


def save_hf(model: Llama, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
            metadata: dict | None = None, chat_template: str | None = None, stop_strings: Sequence[str] = ()) -> Path:
    """Write `model` as a HF Llama dir, atomically (model/atomic.py): an existing `out_dir` is
    swapped out only after the complete new dir is on disk. A chat model also gets its template (Jinja
    text, model/chat.py), as `chat_template` in tokenizer_config.json (where transformers'
    `apply_chat_template` finds it), and its turn-ending strings as `stop_strings` in
    generation_config.json."""
    if chat_template is not None and tokenizer_dir is None:
        raise ValueError("chat_template: a chat model needs tokenizer_dir (the template lives in its config)")
    config = config_to_hf(model.config, model.lm_head.weight.dtype)
    if metadata:
        config["tinyllama"] = metadata
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "max_length": model.config.max_seq_len}
    if stop_strings:
        generation["stop_strings"] = list(stop_strings)
    with atomic_dir(out_dir) as tmp:
        save_file(to_hf_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(tmp / CONFIG_FILE, config)
        _write_json(tmp / GENERATION_CONFIG_FILE, generation)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp)
        if chat_template is not None:
            tokenizer_config = json.loads((tmp / TOKENIZER_CONFIG_FILE).read_text())
            _write_json(tmp / TOKENIZER_CONFIG_FILE, {**tokenizer_config, "chat_template": chat_template})
    return Path(out_dir)


