"""The file names of the two dirs model/ reads and writes: a Hugging Face Llama checkpoint dir and its
tokenizer files. Names only (no imports), so the pipeline's on-disk contract (tasks/layout.py) can
re-export them without loading torch."""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"

TOKENIZER_MODEL_FILE = "tokenizer.model"          # SentencePiece: what llama.cpp's converter reads
TOKENIZER_JSON_FILE = "tokenizer.json"            # HF tokenizers backend
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"   # transformers' settings, the chat template
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_MODEL_FILE, TOKENIZER_JSON_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)
