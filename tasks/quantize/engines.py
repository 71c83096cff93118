"""The engines a quantized model runs on, behind one call: token ids → logits at every position.

`OursEngine` is our torch Llama (fp32, or int8 after `model.quant.quantize_int8`); `LlamaCppEngine` is
llama.cpp itself, through llama-cpp-python with `logits_all=True`, so a GGUF is judged by the numbers
llama.cpp computes from it, not by our reading of the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class OursEngine:
    def __init__(self, model):
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self.n_ctx = model.config.max_seq_len

    @torch.inference_mode()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([tokens]))[0].float()

    def close(self) -> None:
        self.model = None


class LlamaCppEngine:
    def __init__(self, path: str | Path, n_ctx: int, threads: int = 2):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                         n_threads=threads, n_threads_batch=threads, verbose=False)
        self.vocab_size = self.llm.n_vocab()
        self.n_ctx = n_ctx

    def logits(self, tokens: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[: len(tokens)], dtype=np.float32))

    def close(self) -> None:
        self.llm.close()
