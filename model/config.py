"""Llama architecture hyperparameters and the named presets (recipes as data, like torchtitan).

A preset is a plain function returning a `LlamaConfig`; `PRESETS` maps its public name.
Validation lives here so every caller (CLI, training, HF import) gets the same errors,
each naming the offending field and value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class LlamaConfig:
    n_layer: int
    n_head: int
    n_kv_head: int
    dim: int
    mlp_dim: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_kv_head", "dim", "mlp_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name}: must be a positive integer, got {value!r}")
        if self.dim % self.n_head:
            raise ValueError(f"model.n_head: {self.n_head} does not divide model.dim={self.dim}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_kv_head: {self.n_kv_head} does not divide model.n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"model.dim: head size {self.head_dim} (dim/n_head) must be even for RoPE")
        if self.norm_eps <= 0:
            raise ValueError(f"model.norm_eps: must be > 0, got {self.norm_eps!r}")
        if self.rope_base <= 0:
            raise ValueError(f"model.rope_base: must be > 0, got {self.rope_base!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count, computed from the shapes (no weights are built)."""
        kv_dim = self.n_kv_head * self.head_dim
        attn = self.dim * self.dim * 2 + self.dim * kv_dim * 2
        mlp = 3 * self.dim * self.mlp_dim
        per_layer = attn + mlp + 2 * self.dim
        embedding = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        total = embedding + self.n_layer * per_layer + self.dim + head
        return total if include_embedding else total - embedding

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N (N without the input embedding) + 12·L·d·T (PaLM / nanoGPT)."""
        return 6 * self.num_params(include_embedding=False) + 12 * self.n_layer * self.dim * seq_len

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> LlamaConfig:
        known = {f.name for f in fields(self)}
        for key in overrides:
            if key not in known:
                raise ValueError(f"model.overrides.{key}: unknown field (known: {', '.join(sorted(known))})")
        return replace(self, **overrides)


def tinyllama_1_1b() -> LlamaConfig:
    """The TinyLlama recipe: exactly 1,100,048,384 parameters."""
    return LlamaConfig(n_layer=22, n_head=32, n_kv_head=4, dim=2048, mlp_dim=5632,
                       vocab_size=32000, max_seq_len=2048)


def bench_55m() -> LlamaConfig:
    """The 55M config the training-step benchmark compares against transformers."""
    return LlamaConfig(n_layer=8, n_head=8, n_kv_head=2, dim=512, mlp_dim=1408,
                       vocab_size=32000, max_seq_len=512)


def tiny() -> LlamaConfig:
    """~3M parameters: learns the embedded corpus on 2 CPU cores in minutes."""
    return LlamaConfig(n_layer=6, n_head=6, n_kv_head=2, dim=192, mlp_dim=512,
                       vocab_size=2048, max_seq_len=256)


def micro() -> LlamaConfig:
    """The smallest useful model, for unit tests."""
    return LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, dim=64, mlp_dim=128,
                       vocab_size=512, max_seq_len=128)


PRESETS = {
    "tinyllama-1.1b": tinyllama_1_1b,
    "bench-55m": bench_55m,
    "tiny": tiny,
    "micro": micro,
}


def preset(name: str) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()
