"""What a replica serves, read from a model dir: weights, tokenizer, chat template, stop strings, lineage.

A model dir is the pipeline's HF Llama dir (docs/CONTRACTS.md): config.json (with the `tinyllama`
metadata the stages write), model.safetensors, the tokenizer files, `tokenizer_config.json`'s
`chat_template` for chat variants, `generation_config.json`'s `stop_strings`. Registry references
(`models:/...`) are resolved to such a dir before they get here (tasks/deploy/), so a replica needs
nothing but the path: a local dir, or a dir published on shared storage that it copies first
(serving/fetch.py: how a cluster's GPU replicas get the head's model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from model.devices import check_device, check_dtype
from model.files import GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE
from model.hf import load_hf, read_hf_config
from model.llama import Llama
from model.speculative import PromptLookup
from model.tokenizer import Tokenizer
from serving.fetch import is_remote, local_model_dir, read_text

PROMPT_LOOKUP = "prompt-lookup"


@dataclass
class ServedModel:
    name: str
    directory: Path
    model: Llama
    tokenizer: Tokenizer
    chat_template: str | None
    stop_strings: tuple[str, ...]
    lineage: dict = field(default_factory=dict)
    draft: Llama | PromptLookup | None = None

    @property
    def context(self) -> int:
        limit = self.model.config.max_seq_len
        if isinstance(self.draft, Llama):
            limit = min(limit, self.draft.config.max_seq_len)
        return limit


def _json(path: str | Path) -> dict:
    """A JSON file on local disk ({} when absent) or on shared storage."""
    if not is_remote(str(path)) and not Path(path).is_file():
        return {}
    try:
        return json.loads(read_text(str(path)))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _quantize(model: Llama, quant: str) -> Llama:
    if quant == "none":
        return model
    try:
        from model.quant import quantize_int8
    except ImportError:
        raise ValueError("quant: int8 needs model/quant.py (the quantization work), which this build lacks") from None
    return quantize_int8(model)


def lineage(directory: Path, lineage_file: str | None) -> dict:
    """Where the weights came from: config.json's `tinyllama` metadata (milestone, tokens seen, base
    model, MLflow run of the stage that wrote them) plus the deploy stage's lineage file (registry
    name and version, alias, MLflow run)."""
    info = dict(read_hf_config(directory).get("tinyllama") or {})
    if lineage_file:
        info.update(_json(lineage_file))
    return info


def load(model_dir: str, name: str | None = None, draft: str | None = None, quant: str = "none",
         lineage_file: str | None = None, device: str = "cpu", dtype: str = "fp32") -> ServedModel:
    """Load everything a replica serves, on `device` in `dtype` (model/devices.py); `ValueError`s name the
    file or argument at fault."""
    directory = local_model_dir(model_dir)
    if not directory.is_dir():
        raise ValueError(f"model: not a directory: {directory}")
    where = {"device": check_device(device), "dtype": check_dtype(dtype)}
    model = _quantize(load_hf(directory, **where), quant)
    tokenizer = Tokenizer.load(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"model: tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's "
                         f"{model.config.vocab_size}")
    template = _json(directory / TOKENIZER_CONFIG_FILE).get("chat_template")
    stops = tuple(_json(directory / GENERATION_CONFIG_FILE).get("stop_strings") or ())
    drafter: Llama | PromptLookup | None = None
    if draft == PROMPT_LOOKUP:
        drafter = PromptLookup()
    elif draft:
        draft = str(local_model_dir(draft))
        if not Path(draft).is_dir():
            raise ValueError(f"draft: not a directory (nor {PROMPT_LOOKUP!r}): {draft}")
        drafter = _quantize(load_hf(draft, **where), quant)
        if drafter.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"draft: vocab_size {drafter.config.vocab_size} differs from the model's "
                             f"{model.config.vocab_size}")
    info = lineage(directory, lineage_file)
    return ServedModel(name or info.get("registered_model") or directory.name, directory, model, tokenizer,
                       template, stops, info, drafter)
