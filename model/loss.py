"""Next-token cross entropy (and per-token log-probabilities, for DPO) fused with the output
projection, computed in row chunks.

Why: with a 32000-token vocabulary the logits of one micro-batch (batch × seq × vocab, fp32)
are hundreds of MB to GBs (8 × 2048 rows: 2 GB), and a plain `lm_head` + `cross_entropy` keeps
them, their log-softmax and their gradient alive at once. Here each chunk of rows is projected,
reduced to its loss *and* its gradient at once, and dropped, so at most `chunk × vocab` logits
exist (the idea of Liger's fused linear cross entropy). The FLOPs are the same three matmuls.
The per-chunk elementwise work (log-softmax, loss, gradient) has an eager form and a form
for torch.compile, used when a compiled caller (`Llama.compile_loss`) traces through here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# At most this many logits per chunk (128 MB in fp32; ~1000 rows at vocab 32000). Measured on a 2-core
# AVX2 CPU, the three lm_head matmuls run ~1.5× slower in 131-row chunks than in 512+ rows, and no
# faster than 1024 rows with the full batch, so chunks stay large; the saving is the logits' memory.
_CHUNK_ELEMENTS = 1 << 25


def _eager_chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor):
    """(summed loss, d(loss·scale)/d(logits)) of one chunk; ignored rows add nothing and get zero gradient.
    Built from aten's fused log_softmax and then in place on its output: the fewest full passes eagerly."""
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)[:, None]
    logp = torch.log_softmax(logits.float(), dim=-1)
    loss = -(logp.gather(1, safe).squeeze(1) * valid).sum()
    grad = logp.exp_().scatter_add_(1, safe, torch.full_like(logp[:, :1], -1.0))  # softmax - onehot
    return loss, grad.mul_((valid * scale)[:, None])


def _fused_chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor):
    """The same, written for torch.compile: one reduction (logsumexp) and one pointwise pass that
    writes the gradient, the one-hot being an index comparison rather than a scatter. Compiled, it
    runs as fast as the eager form does eagerly, and ~1/3 faster than inductor's code for a
    log_softmax + scatter form (235 vs 348 ms on 2048 × 32000 logits, 2 CPU cores); run eagerly it
    is ~4× slower, hence two forms."""
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)[:, None]
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    loss = ((lse.squeeze(1) - logits.gather(1, safe).squeeze(1)) * valid).sum()
    onehot = torch.arange(logits.shape[1], device=logits.device) == safe
    return loss, (torch.exp(logits - lse) - onehot.float()) * (valid * scale)[:, None]


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor):
    """The form for the compiler while torch.compile traces, else the eager form."""
    if torch.compiler.is_compiling():
        return _fused_chunk_loss_and_grad(logits, targets, scale)
    return _eager_chunk_loss_and_grad(logits, targets, scale)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
        autocast = torch.is_autocast_enabled(hidden.device.type)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            loss, grad = _chunk_loss_and_grad(h @ weight.t(), targets[start:start + chunk], 1.0 / n_valid)
            total += loss
            grad = grad.to(hidden.dtype)
            if want_hidden:
                grad_hidden[start:start + chunk] = grad @ weight
            if not want_weight:
                continue
            # Summed over chunks in fp32 whatever the compute dtype (bf16 weights under FSDP2's policy, or
            # autocast): one rounding at the end, not one per chunk.
            if grad_weight is None:  # the first chunk's product is the sum so far (no zero-filled buffer)
                grad_weight = (grad.t() @ h).float()
            elif grad.dtype == h.dtype == torch.float32 and not autocast:
                grad_weight.addmm_(grad.t(), h)
            else:
                grad_weight += grad.t() @ h  # low-precision matmul, fp32 sum
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_output.to(grad_weight.dtype), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean cross entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX rows skipped).

    hidden: (..., dim); weight: (vocab, dim); targets: (...) int64. Equals
    `F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten(), ignore_index=-100)`.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"targets: {targets.shape[0]} positions for {hidden.shape[0]} hidden rows")
    if chunk is None:  # equal chunks, so a compiled chunk function sees one shape
        pieces = -(-hidden.shape[0] // max(1, _CHUNK_ELEMENTS // weight.shape[0]))
        chunk = max(1, -(-hidden.shape[0] // pieces))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    # Evaluation: the loss alone, still chunked so the full logits never exist.
    total = sum(F.cross_entropy((hidden[i:i + chunk] @ weight.t()).float(), targets[i:i + chunk],
                                ignore_index=IGNORE_INDEX, reduction="sum")
                for i in range(0, hidden.shape[0], chunk))
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class _LinearTokenLogprobs(torch.autograd.Function):
    """Per-token log p(target) of `hidden @ weight.T`, chunked like `_LinearCrossEntropy`. Unlike a
    mean loss, the upstream gradient differs per token (DPO weighs each sequence by its own sigmoid),
    so the gradient cannot be formed in the forward pass: backward recomputes each chunk's logits
    (one extra matmul) rather than keeping them alive between the passes."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return _token_logprobs(hidden, weight, targets, chunk)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None  # fp32 sum
        for start in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk]
            valid = t != IGNORE_INDEX
            # d log p(t) / d logits = onehot(t) - softmax, scaled by the upstream gradient of each row.
            grad = torch.softmax((h @ weight.t()).float(), dim=-1).neg_()
            grad.scatter_add_(1, torch.where(valid, t, 0)[:, None], torch.ones_like(grad[:, :1]))
            grad = grad.mul_((grad_output[start:start + ctx.chunk].float() * valid)[:, None]).to(hidden.dtype)
            if want_hidden:
                grad_hidden[start:start + ctx.chunk] = grad @ weight
            if want_weight:
                grad_weight += grad.t() @ h
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def _token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        t = targets[start:start + chunk]
        valid = t != IGNORE_INDEX
        logits = (hidden[start:start + chunk] @ weight.t()).float()
        picked = logits.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
        out[start:start + chunk] = (picked - torch.logsumexp(logits, dim=-1)) * valid
    return out


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] per position, fp32, 0 where the target is IGNORE_INDEX.

    hidden: (..., dim); weight: (vocab, dim); targets: (...) int64 → (N,) with N = targets.numel().
    Equals `F.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets)` at the valid positions.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"targets: {targets.shape[0]} positions for {hidden.shape[0]} hidden rows")
    chunk = chunk or max(1, _CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearTokenLogprobs.apply(hidden, weight, targets, chunk)
    return _token_logprobs(hidden, weight, targets, chunk)
