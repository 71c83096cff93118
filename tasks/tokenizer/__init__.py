"""The `tokenizer` stage: train or convert the tokenizer into `{paths.models}/tokenizer/` (stage.py)."""
