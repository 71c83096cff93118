"""int8 quantization for our own engine (`serving --quant int8`).

Every `nn.Linear` of a Llama (q/k/v/o, gate/up/down, lm_head) becomes an `Int8Linear`: its weight
stored as int8 with one symmetric scale per output channel (w ≈ q · s, |q| ≤ 127), a quarter of the
fp32 bytes; the scales are rounded up to bf16 *before* the weights are rounded, so the stored pair is
exact (|w - q·s| ≤ s/2). The embedding (a lookup, no matmul) and the norms stay as they are.

How the matmul runs depends on the device:
- CPU: the activations are quantized too, per row (per token: one symmetric scale from the row's
  largest magnitude), and multiplied in integers by `torch._int_mm` (int8 x int8 -> int32, oneDNN's
  int8 GEMM, VNNI where the CPU has it), then scaled back: what llama.cpp's Q8_0 does, per row
  instead of per block of 32. Why not weight-only: torch's weight-only kernel `aten._weight_int8pack_mm`
  converts every int8 weight to float for each row it multiplies, so it is compute-bound and its time
  grows with the rows. 55M config, 2-core AMD EPYC (AVX-512 VNNI): its matmuls for one step took 1.79 ->
  1.40 ms at 1 row, 4.6 -> 3.0 ms at 5 (a speculative verify), 18.0 -> 7.4 ms at 32 (a serving batch); the
  whole compiled step at 1 row no faster (3.1-3.9 against 3.9-4.3 ms), at 5 rows 7.0-7.1 -> 5.4-5.9 ms.
  The price: the tiny chat model's mean KL divergence from fp32 0.000050 -> 0.000130 (llama.cpp's Q8_0
  0.000037), the same top token 99.33 -> 99.49%, PPL ratio 1.0000 -> 0.9992 (benchmarks/README.md,
  "int8 activations"); `quantize.gates.int8` holds it to the stage's bound. Each row is quantized alone,
  so a token's output does not depend on which other tokens share its step (batching changes no number),
  and the integer product is exact. In a compiled step of one row, a model of at least `LOOPED_MODEL_WEIGHTS`
  skips oneDNN: `one_row_int8_product` computes the same integers in fp32 (exactly: sums short enough never
  to round) in a loop inductor writes and fuses with the rounding, as the fp32 engine does with its one-row
  linears (model/packed.py). 55M: the step alone 265-308 -> 319-336 tok/s in four alternations; int8 /
  llama.cpp Q8_0 0.54-0.66 -> 0.62-0.72, within that benchmark's noise. Summed over `interleaved` groups of rows
  (model/packed.py: one accumulator per group), int8 / Q8_0 went 0.62-0.77 -> 0.72-0.83 in eight alternating pairs,
  and two later whole runs gave 0.76 and 0.65: the 0.8 target met in 4 of 10 runs.
- CUDA: weight-only (`_weight_int8pack_mm` with bf16 activations; `_int_mm` there needs more than 16 rows).

Grouped matmuls: q/k/v read the same input, and so do gate/up; each group becomes one `Int8Linear` on
the concatenated weights (`qkv` on the attention, `gate_up` on the MLP), so a decode step runs one int8
matmul per group instead of three or two (fewer dispatches, one pass over the activations). Scales are
per output channel, so grouping changes no number: the grouped layer's rows are the separate layers' rows.
"""

from __future__ import annotations

import torch
from torch import nn

from model.llama import Llama
from model.packed import interleaved

QMAX = 127


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, bf16 per-row scales) with weight ≈ q * scale[:, None] and |q| ≤ 127."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / QMAX).clamp(min=torch.finfo(torch.bfloat16).tiny)
    rounded = scale.to(torch.bfloat16)
    up = torch.nextafter(rounded, torch.tensor(float("inf"), dtype=torch.bfloat16))
    rounded = torch.where(rounded.float() < scale, up, rounded)  # never below the exact scale: no clipping
    q = torch.round(weight / rounded.float()[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, rounded


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def _rounded_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows`' integers, still fp32: round(x · 127 / max|row|) is within [-127, 127] by construction
    (an all-zero row: 127 over a floor small enough to keep nothing but zeros, and finite)."""
    x = x.float()
    peak = x.abs().amax(dim=1, keepdim=True).clamp(min=QMAX * torch.finfo(torch.float32).tiny)
    return torch.round(x * (QMAX / peak)), peak / QMAX


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, fp32 (M, 1) scales) with x ≈ q * scale, each row of the (M, K) `x` scaled alone."""
    rows, scale = _rounded_rows(x)
    return rows.to(torch.int8), scale


# Products of two int8 values in [-127, 127] are at most 127² in magnitude, so fp32 holds the sum of up to this
# many exactly (every partial sum an integer below 2^24), whatever order a vectorized loop adds them in.
EXACT_FP32_TERMS = 2 ** 24 // QMAX ** 2
# A compiled one-row step multiplies in its own loop (`one_row_int8_product`) when the model's int8 weights are at
# least this many: more than a CPU's caches keep from token to token, so every step streams them from memory.
# A model that stays in cache is faster through oneDNN (the tiny preset, 1.2M weights: int8 / llama.cpp Q8_0
# 0.58-0.60 through oneDNN, 0.46-0.52 looped; the 55M config, 42M: see the module docstring; benchmarks/README.md).
LOOPED_MODEL_WEIGHTS = 2 ** 23


def one_row_int8_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The integer product of one rounded row (1, K) and the (N, K) int8 `weight`, exactly what `torch._int_mm`
    gives (as fp32), written as multiplies and sums in fp32 over chunks of K short enough to be exact, the
    chunks' sums added in int32: in a compiled graph inductor makes it one vectorized loop over the int8
    weights, fused with the row's rounding, in place of oneDNN's int8 GEMM (which streams its weights at
    about half the copy bandwidth at one row), over `interleaved` groups of the weight's rows."""
    n, k = weight.shape
    chunks = next(c for c in range(-(-k // EXACT_FP32_TERMS), k + 1) if k % c == 0)

    def product(part: torch.Tensor) -> torch.Tensor:
        partial = (rows.reshape(1, chunks, k // chunks) * part.reshape(-1, chunks, k // chunks).float()).sum(-1)
        return (partial.squeeze(-1) if chunks == 1 else partial.to(torch.int32).sum(-1)).float()

    return interleaved(product, weight).reshape(1, n)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, looped: bool = False) -> torch.Tensor:
    """(M, K) activations times the (N, K) int8 `weight` with its (N,) scales -> (M, N) fp32 (see the docstring);
    `looped`: a compiled graph of one row on the CPU uses `one_row_int8_product` (the same numbers)."""
    if x.device.type == "cpu":
        rows, row_scale = _rounded_rows(x)
        if looped and torch.compiler.is_compiling() and x.shape[0] == 1:
            product = one_row_int8_product(rows, weight)
        else:
            product = torch._int_mm(rows.to(torch.int8), weight.t()).float()
        return product * row_scale * scale.float()
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), weight, scale).float()


class Int8Linear(nn.Module):
    """A bias-free linear layer whose weight is int8 with per-output-channel bf16 scales."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.looped = False  # `quantize_int8` sets it from the whole model's size
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor | None = None) -> Int8Linear:
        """`linear` quantized (or `weight`, when given, in its place: a group's concatenated weights)."""
        if linear.bias is not None:
            raise ValueError("Int8Linear: a linear layer with a bias is not supported (Llama has none)")
        return cls(*quantize_weight(linear.weight if weight is None else weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x.reshape(-1, self.in_features), self.weight, self.scale, self.looped)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def _group(module: nn.Module) -> None:
    """Replace `module`'s linear layers that read one input by one grouped `Int8Linear` (see the docstring)."""
    for group, names in GROUPS.items():
        if all(isinstance(getattr(module, name, None), nn.Linear) for name in names):
            layers = [getattr(module, name) for name in names]
            grouped = Int8Linear.from_linear(nn.Linear(layers[0].in_features,
                                                       sum(layer.out_features for layer in layers),
                                                       bias=False, device="meta"),
                                             torch.cat([layer.weight for layer in layers]))
            grouped.splits = [layer.out_features for layer in layers]
            for name in names:
                delattr(module, name)
            setattr(module, group, grouped)


def quantize_int8(model: Llama) -> Llama:
    """Replace every `nn.Linear` of `model` by an `Int8Linear` (q/k/v and gate/up grouped), in place;
    returns the model (in eval mode). It forwards and decodes as before; it is for inference only."""
    for module in list(model.modules()):
        _group(module)
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_linear(linear))
    layers = [module for module in model.modules() if isinstance(module, Int8Linear)]
    looped = sum(layer.weight.numel() for layer in layers) >= LOOPED_MODEL_WEIGHTS
    for layer in layers:
        layer.looped = looped
    return model.eval()
