"""The `quantize` stage: GGUF files for llama.cpp and int8 weights for our engine, judged by
llama.cpp's own quality measures (`tinyllama quantize`). Heavy imports happen inside functions."""

from tasks.quantize.stage import add_arguments, main, quantize

__all__ = ["add_arguments", "main", "quantize"]
