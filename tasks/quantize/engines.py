"""The engines a quantized model runs on, behind one call: token ids → logits at every position.

`OursEngine` is our torch Llama (fp32, bf16, or int8 after `model.quant.quantize_int8`); `LlamaCppEngine` is
llama.cpp itself, through llama-cpp-python with `logits_all=True`, so a GGUF is judged by the numbers
llama.cpp computes from it, not by our reading of the file.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

_default_params_lock = threading.Lock()


def load_llama_cpp(path: str | Path, **options):
    """llama.cpp's `Llama` for a GGUF file: every place that runs llama.cpp loads it here.

    On a CPU with AMX, ggml moves Q8_0/Q4_0 weights into its AMX buffers ("extra buffer types"), and
    decoding with them crashes the process (SIGSEGV in `llama_decode`, llama-cpp-python 0.3.36 built
    natively on a Xeon with AMX_INT8: every Q8_0/Q4_0 file tried, the tiny profile's and bench-55m's; F16 and
    Q5_0 unaffected). There the weights stay in plain CPU buffers; elsewhere llama.cpp keeps its own layout."""
    from llama_cpp import Llama

    with _plain_cpu_buffers() if _has_amx() else nullcontext():
        return Llama(model_path=str(path), **options)


@functools.cache
def _has_amx() -> bool:
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode()


@contextmanager
def _plain_cpu_buffers():
    """llama-cpp-python's `Llama` takes no `use_extra_bufts`: while it loads, its model defaults say so."""
    import llama_cpp.llama_cpp as low_level

    default = low_level.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    with _default_params_lock:
        low_level.llama_model_default_params = without_extra_buffers
        try:
            yield
        finally:
            low_level.llama_model_default_params = default


class OursEngine:
    """Our Llama on `device` (the stage's `eval.device`: the GPU profile measures bf16 and int8 on the GPU that
    serves them, where a CPU without bf16 units would take hours); logits come back to the CPU in fp32."""

    def __init__(self, model, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.vocab_size = model.config.vocab_size
        self.n_ctx = model.config.max_seq_len

    @torch.inference_mode()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([tokens], device=self.device))[0].float().cpu()

    def close(self) -> None:
        self.model = None


class LlamaCppEngine:
    def __init__(self, path: str | Path, n_ctx: int, threads: int = 2):
        self.llm = load_llama_cpp(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                  n_threads=threads, n_threads_batch=threads, verbose=False)
        self.vocab_size = self.llm.n_vocab()
        self.n_ctx = n_ctx

    def logits(self, tokens: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[: len(tokens)], dtype=np.float32))

    def close(self) -> None:
        self.llm.close()
