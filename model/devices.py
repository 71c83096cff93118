"""Where and in what precision the engine runs: `device` ("cpu" | "cuda") and `dtype` ("fp32" | "bf16" | "fp16").

One place that turns the names users write (flags, params, Serve args) into torch's objects, and that
refuses a CUDA request on a machine without CUDA with one line naming the field, before anything loads.
"""

from __future__ import annotations

import torch

DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(device: str, field: str = "device") -> torch.device:
    """The torch device for `device`; ValueError (naming `field`) when it is unknown or absent here."""
    if device not in DEVICES:
        raise ValueError(f"{field}: {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field}: cuda requested, but this machine has no CUDA device torch can use "
                         f"(torch {torch.__version__}, cuda build: {torch.version.cuda or 'none'})")
    return torch.device(device)


def check_dtype(dtype: str, field: str = "dtype") -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"{field}: {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]

