"""fp32 linear layers for decoding on the CPU: inductor's own loop at one row, oneDNN on reordered weights above.

Why: at a decode step's few rows a linear layer streams its whole weight, and torch's fp32 `F.linear` runs
MKL's small-M GEMM, which streams it at a fraction of the memory bandwidth on some CPUs. Measured on a
2-core AMD EPYC (AVX-512), copy bandwidth 32 GB/s: the 55M config's 32000 x 512 output projection at one row
took 6.9-7.0 ms through MKL (9 GB/s) and 2.5-2.7 ms through oneDNN on a weight reordered once into its
blocked layout, 11-12 ms against 1.8 ms at 5 rows (a speculative verify); the 55M's compiled decode step at
one row went from 17.3-17.8 ms to 10.2-11.3 ms (benchmarks/README.md, "fp32 through oneDNN").

How: `pack_linears(model)` turns the model's bias-free fp32 `nn.Linear`s into `PackedLinear`s holding the same
parameters (state dicts, training and quantization see plain linear layers). Without autograd (decoding, under
`no_grad` / `inference_mode`), on a CPU fp32 input:
- in a compiled graph of one row (a lone sequence's decode step), every one of them is a multiply and a sum
  (`one_row_linear`) that inductor writes as its own vectorized loop over the weight: no library call, whose
  fixed cost dominates small weights (the tiny preset's 43 MKL GEMVs took ~40 us each) and which streams large
  ones slower than that loop does (the 55M's compiled step at one row 10.3-12.4 -> 5.3-6.9 ms); a large weight's
  rows are summed in `interleaved` groups, one accumulator each;
- otherwise, the large ones (`MIN_WEIGHTS` elements and up) call `tinyllama::packed_linear`, a custom op that
  torch.compile calls from its graph as an opaque kernel; it reorders the weight on first use and keeps the
  reordered copy while the weight is unchanged (its version counter: an optimizer step or `load_state_dict`
  reorders it again). Cost: one more copy of each such weight in memory. Smaller weights stay on MKL: the op's
  call from a compiled graph costs ~20 us, more than such a weight gains (the tiny preset's step went from 1.5 to
  2.3 ms with every linear packed; its largest weight is 2048 x 192).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MIN_WEIGHTS = 1 << 19  # elements (2 MiB of fp32): the 55M config's MLP and output projection, not its q/k/v/o

# weight.data_ptr() -> (the weight, its version when reordered, the reordered copy). The entry holds the weight,
# so no other tensor can be allocated at that address while it exists; its module's finalizer drops it.
_reordered: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}


def available() -> bool:
    return torch.backends.mkldnn.is_available()


def _reordered_weight(weight: torch.Tensor) -> torch.Tensor:
    entry = _reordered.get(weight.data_ptr())
    if entry is not None and entry[0].shape == weight.shape and entry[1] == weight._version:
        return entry[2]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=1)
    _reordered[weight.data_ptr()] = (weight.detach(), weight._version, packed)
    return packed


@torch.library.custom_op("tinyllama::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) through oneDNN on the reordered copy of `weight`."""
    flat = x.reshape(-1, weight.shape[1])
    y = torch.ops.mkldnn._linear_pointwise(flat, _reordered_weight(weight), None, "none", [], "")
    return y.reshape(*x.shape[:-1], weight.shape[0])


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _forget(pointer: int) -> None:
    _reordered.pop(pointer, None)


# `interleaved` splits a weight's rows into this many groups, each its own sum: inductor fuses sibling reductions into
# one loop that keeps an accumulator per group. A single sum over a weight's rows is bound by the latency of its one
# accumulator's adds, not by memory. 2-core AMD EPYC: the 55M's int8 32000 x 512 output projection 664-731 -> 537-544
# us, its compiled int8 step 2.86-3.20 -> 2.63-2.77 ms, its fp32 step 6.68-7.36 -> 5.49-6.90 ms; 8 groups no faster
# than 4 (benchmarks/README.md, "Interleaved rows").
INTERLEAVED_ROWS = 4


def interleaved(product: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """`product(weight)`, whose last dimension has one output per row of `weight`, computed on `INTERLEAVED_ROWS`
    groups of those rows (when they divide evenly) and concatenated: the same numbers, each output still its own
    row's sum in its own order (see `INTERLEAVED_ROWS` for why)."""
    groups = INTERLEAVED_ROWS if weight.shape[0] % INTERLEAVED_ROWS == 0 else 1
    return torch.cat([product(part) for part in weight.chunk(groups)], dim=-1)


def one_row_linear(x: torch.Tensor, weight: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """`F.linear(x, weight)` for an `x` of one row, written as a multiply and a sum: in a compiled graph, inductor
    makes it one vectorized loop over the weight's rows, fused with what feeds it, in place of a BLAS call;
    `interleave`: over `interleaved` groups of rows."""
    def product(rows: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(-2) * rows).sum(-1)

    return interleaved(product, weight) if interleave else product(weight)


class PackedLinear(nn.Linear):
    """An `nn.Linear` (bias-free, fp32) prepared for decoding on the CPU: in a compiled graph of one row,
    `one_row_linear`; else, when `reorders` (a large weight), `packed_linear`; else `F.linear`. Anything else
    (autograd on, another device or dtype) runs `nn.Linear`'s own forward."""

    def __init__(self, linear: nn.Linear, reorders: bool = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias, self.reorders = linear.weight, None, reorders
        if reorders:  # only reordered weights have an entry to drop
            weakref.finalize(self, _forget, self.weight.data_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32 \
                or self.weight.dtype != torch.float32:
            return F.linear(x, self.weight)
        if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
            # a large weight streams from memory, where interleaving pays; the tiny preset's, which stay in cache,
            # were slower interleaved (its compiled step 520-548 -> 609-718 us)
            return one_row_linear(x, self.weight, interleave=self.reorders)
        return packed_linear(x, self.weight) if self.reorders else F.linear(x, self.weight)


def pack_linears(model: nn.Module, min_weights: int = MIN_WEIGHTS) -> nn.Module:
    """Replace `model`'s bias-free fp32 `nn.Linear`s by `PackedLinear`s, in place, those of at least `min_weights`
    elements reordered for oneDNN (a no-op without oneDNN); returns `model`."""
    if not available():
        return model
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.bias is None and module.weight.dtype == torch.float32]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr,
                PackedLinear(linear, reorders=linear.weight.numel() >= min_weights))
    return model
