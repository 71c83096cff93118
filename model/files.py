"""The file names of the two dirs model/ reads and writes: a Hugging Face Llama checkpoint dir and its
tokenizer files; the GGUF types it exports; and where a node caches model dirs it fetched. Names and
places only (stdlib imports), so the pipeline's on-disk contract (tasks/layout.py), its params schema and
the stages that fetch models can use them without loading torch."""

import os
from pathlib import Path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SERVING_SEAL = "serving-seal.json"  # written last into a model dir published for a cluster's replicas: files' sha256

TOKENIZER_MODEL_FILE = "tokenizer.model"          # SentencePiece: what llama.cpp's converter reads
TOKENIZER_JSON_FILE = "tokenizer.json"            # HF tokenizers backend
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"   # transformers' settings, the chat template
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_MODEL_FILE, TOKENIZER_JSON_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)

GGUF_TYPES = ("F16", "Q8_0", "Q4_0", "Q5_0")  # the GGUF files model/gguf.py writes (llama.cpp's type names)

MODEL_CACHE_ENV = "TINYLLAMA_MODEL_CACHE"


def model_cache_root() -> Path:
    """This node's cache of fetched model dirs: published ones (serving/fetch.py) and registry versions
    (tasks/registry.py). Where a copy lives, not what it holds: the sft/dpo/quantize stages read registry
    versions through it, and moving it must not rerun them."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "tinyllama" / "models")
