"""The Llama 2 architecture in plain torch, readable in one sitting (after nanoGPT / lit-gpt).

RMSNorm → grouped-query attention (RoPE, `scaled_dot_product_attention`) → RMSNorm → SwiGLU,
with an optional KV cache for decoding. Parameter names follow Hugging Face's
`LlamaForCausalLM` minus the `model.` prefix, so conversion (model/hf.py) is a rename.

Speed choices (benchmarks/train_step.py measures them against transformers): grouped-query
attention goes to SDPA with `enable_gqa` instead of copying K/V per query head (the KV cache
holds only the KV heads; under a mask, where SDPA's kernels would copy them, each group of query heads
is folded onto its KV head instead: `masked_attention`), training projects q, k and v in one matmul
(and gate and up in another), the training loss never materialises the full logits (model/loss.py),
and `compile_loss` compiles the whole loss into one graph (`compile_blocks`, for sharded models, the
one decoder-block graph every layer shares).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import LlamaConfig
from model.loss import linear_cross_entropy, linear_token_logprobs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF and Meta do) so bf16 training matches the reference; a no-op cast in fp32.
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cache(config: LlamaConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, shape (seq_len, head_dim), fp32, in HF's "rotate half" layout."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim), or (batch, 1, seq, head_dim) for
    per-row positions; cast to x's dtype as HF does."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Preallocated keys/values of every layer for one decoding session.

    A separate object (not module state), so one model can serve several sessions and a
    speculative decoder can roll back by simply writing at an earlier position: `update`
    returns only the prefix up to the tokens just written, so stale entries past it are ignored.
    """

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (config.n_layer, batch, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + k.shape[2]
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def packed_attention_mask(positions: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) boolean mask for rows that pack several sequences, each starting at
    position 0: causal inside a sequence, nothing across sequences (block-diagonal), so a packed
    sequence sees exactly what it would see alone."""
    sequence = (positions == 0).cumsum(-1)
    same = sequence[:, :, None] == sequence[:, None, :]
    causal = torch.ones(positions.shape[-1], positions.shape[-1], dtype=torch.bool, device=positions.device).tril()
    return (same & causal)[:, None]


def parallel_linear(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """Bias-free `layer(x)` for each layer (q/k/v, gate/up). When training, as one matmul on the
    concatenated weights: its backward is one grad-input matmul instead of one per layer plus adds
    (~25% less time for q/k/v on CPU at the 55M size), while the parameters keep HF's names.
    Decoding keeps separate matmuls (no weight copy per token), and so do quantized layers (model/quant.py)."""
    if not torch.is_grad_enabled() or not all(isinstance(layer, nn.Linear) for layer in layers):
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers])
    return F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA of (b, heads, t, d) queries over (b, kv_heads, L, d) keys/values under a boolean `mask`
    (broadcastable to (b, 1, t, L)), each group of query heads folded into the rows of the KV head it
    shares: (b, kv_heads, group * t, d). Why: under a mask, SDPA's `enable_gqa` costs what repeating K and
    V per query head would (its reference definition), and a decode step reads the whole attended cache;
    folded, K and V are read as cached whichever kernel runs. Measured on CPU, compiled, 32 rows: the 55M
    config's heads over 128 keys 0.37 → 0.19 ms a layer, the 1.1B's over 2048 keys 11.6 → 4.4 ms (CUDA
    kernels not measured)."""
    b, heads, t, d = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    mask = mask if mask.dim() == 4 else mask[None, None]
    rows = mask.shape[0]
    mask = mask[:, :, None].expand(rows, 1, group, t, keys).reshape(rows, 1, group * t, keys)
    y = F.scaled_dot_product_attention(q.reshape(b, kv_heads, group * t, d), k, v, attn_mask=mask)
    return y.view(b, heads, t, d)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_dim = config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.k_proj = nn.Linear(config.dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x, cos, sin, pos: int = 0, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        b, t, _ = x.shape
        if hasattr(self, "qkv"):  # int8, grouped (model/quant.py)
            q, k, v = self.qkv(x).split(self.qkv.splits, dim=-1)
        else:
            q, k, v = parallel_linear(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, pos, k, v)
        gqa = self.n_head != self.n_kv_head
        total = k.shape[2]
        if mask is None and total == t:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            if mask is None and t > 1:  # a chunk after a cached prefix: causal, offset by the prefix
                mask = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(diagonal=total - t)
            y = (F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa) if mask is None  # one query, all keys
                 else masked_attention(q, k, v, mask))
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.mlp_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.mlp_dim, bias=False)
        self.down_proj = nn.Linear(config.mlp_dim, config.dim, bias=False)

    def forward(self, x):
        if hasattr(self, "gate_up"):  # int8, grouped (model/quant.py)
            gate, up = self.gate_up(x).split(self.gate_up.splits, dim=-1)
        else:
            gate, up = parallel_linear(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, pos: int = 0, cache: KVCache | None = None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(config, config.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2·n_layer) (GPT-2)."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if param.dim() == 1:
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(param, 0.0, std)
        self.reset_rope(self.rope_cos.device)

    def reset_rope(self, device=None) -> None:
        """Rebuild the (non-persistent) RoPE tables, e.g. after weights were assigned onto a meta model."""
        self.rope_cos, self.rope_sin = rope_cache(self.config, self.config.max_seq_len, device)

    def hidden_states(self, idx: torch.Tensor, pos: int = 0, cache: KVCache | None = None,
                      mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (batch, seq) token ids → final normed hidden states (batch, seq, dim).

        `positions` (batch, seq): packed rows (SFT), several sequences per row, each restarting at
        position 0; RoPE uses these positions and attention stays inside each sequence.
        With a batch of slots as the cache (model/slots.py `SlotBatch`, which has per-row `positions`),
        each row has its own positions and mask, and `pos`/`mask` are taken from it."""
        t = idx.shape[1]
        slot_positions = getattr(cache, "positions", None)
        if slot_positions is not None:
            slot_positions = slot_positions.clamp(max=self.config.max_seq_len - 1)  # padding: any angle will do
            cos, sin = self.rope_cos[slot_positions][:, None], self.rope_sin[slot_positions][:, None]
            mask = cache.mask
        else:
            limit = cache.max_len if cache is not None else self.config.max_seq_len
            if pos + t > min(limit, self.config.max_seq_len):
                raise ValueError(f"sequence of {pos + t} tokens exceeds the context of "
                                 f"{min(limit, self.config.max_seq_len)}")
            if positions is None:
                cos, sin = self.rope_cos[pos:pos + t], self.rope_sin[pos:pos + t]
            else:
                cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
                mask = packed_attention_mask(positions)
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, pos, cache, mask)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, pos: int = 0, cache: KVCache | None = None,
                mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (batch, seq) token ids → logits (batch, seq, vocab). `pos` is where idx starts in `cache`."""
        return self.lm_head(self.hidden_states(idx, pos, cache, mask, positions))

    def loss(self, rows: torch.Tensor, targets: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross entropy, without materialising the logits (model/loss.py).

        `rows` alone: packed rows of seq_len + 1 ids (inputs rows[:, :-1], targets rows[:, 1:]).
        With `targets` (same shape as `rows`, -100 = ignore, e.g. SFT prompt tokens): rows are the inputs.
        `positions`: see `hidden_states` (packed SFT rows).
        """
        inputs, targets = (rows[:, :-1], rows[:, 1:]) if targets is None else (rows, targets)
        return linear_cross_entropy(self.hidden_states(inputs, positions=positions), self.lm_head.weight, targets)

    def token_logprobs(self, inputs: torch.Tensor, targets: torch.Tensor,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq) log-probability of each target token (0 where the target is -100), without
        materialising the logits; what DPO sums into sequence log-probabilities."""
        hidden = self.hidden_states(inputs, positions=positions)
        return linear_token_logprobs(hidden, self.lm_head.weight, targets).view(targets.shape)

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` tokens (default: max_seq_len)."""
        max_len = min(max_len or self.config.max_seq_len, self.config.max_seq_len)
        weight = self.embed_tokens.weight  # the activations' dtype, also when the linears are int8 (model/quant.py)
        return KVCache(self.config, batch, max_len, weight.dtype, weight.device)

    def compile_loss(self, **compile_kwargs) -> Llama:
        """torch.compile `loss` as a whole (embedding, every block, the chunked loss) into one graph.
        On an unsharded model this is the faster path (benchmarks/train_step.py: ~1.1-1.2× per-block
        compilation); it compiles longer, and it does not compose with FSDP2, whose per-block hooks
        split the graph, so a sharded model uses `compile_blocks`."""
        self.loss = torch.compile(self.loss, **compile_kwargs)
        return self

    def compile_blocks(self, **compile_kwargs) -> Llama:
        """torch.compile each decoder block in place. The blocks share one graph, so compile time is
        that of one block however deep the model; the loss stays eager (model/loss.py)."""
        for block in self.layers:
            block.compile(**compile_kwargs)
        return self
