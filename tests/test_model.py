"""model/: the Llama in plain torch, checked piece by piece against transformers' own modules."""

import pytest
import torch
import torch.nn.functional as F

from model.config import LlamaConfig, micro, tinyllama_1_1b
from model.llama import Llama, RMSNorm, apply_rope, masked_attention, rope_cache
from model.loss import _eager_chunk_loss_and_grad, _fused_chunk_loss_and_grad, linear_cross_entropy

pytestmark = pytest.mark.usefixtures("single_thread")


def _hf_config(config: LlamaConfig, attn: str = "eager"):
    from transformers import LlamaConfig as HFConfig

    from model.hf import config_to_hf

    hf = HFConfig(**config_to_hf(config))
    hf._attn_implementation = attn
    return hf


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Llama(micro()).eval()


def test_tinyllama_param_count_on_meta_device():
    config = tinyllama_1_1b()
    with torch.device("meta"):
        model = Llama(config)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == config.num_params() == 1_100_048_384


def test_tied_embeddings_share_one_tensor():
    config = micro().with_overrides(tie_embeddings=True)
    model = Llama(config)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    assert config.num_params() == micro().num_params() - config.vocab_size * config.dim


@pytest.mark.parametrize("overrides, field", [
    ({"n_head": 5}, "model.n_head"),           # 5 does not divide dim 64
    ({"n_kv_head": 3}, "model.n_kv_head"),     # 3 does not divide 4 heads
    ({"n_layer": 0}, "model.n_layer"),
    ({"norm_eps": 0.0}, "model.norm_eps"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field) as info:
        micro().with_overrides(**overrides)
    assert str(next(iter(overrides.values()))) in str(info.value)


def test_rmsnorm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    ours, theirs = RMSNorm(64, 1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 64) * 5
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def test_rope_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = micro().with_overrides(rope_base=500.0)
    rotary = LlamaRotaryEmbedding(_hf_config(config))
    q, k = torch.randn(2, 4, 33, 16), torch.randn(2, 2, 33, 16)
    positions = torch.arange(10, 43)[None].expand(2, -1)
    cos_hf, sin_hf = rotary(q, positions)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = rope_cache(config, 64)
    torch.testing.assert_close(apply_rope(q, cos[10:43], sin[10:43]), q_hf, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos[10:43], sin[10:43]), k_hf, rtol=0, atol=1e-6)


def test_gqa_attention_matches_transformers_eager_attention(model):
    """Our SDPA(enable_gqa) path against HF's explicit repeat_kv + softmax implementation."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = model.config
    assert config.n_kv_head < config.n_head
    ours = model.layers[1].self_attn
    theirs = LlamaAttention(_hf_config(config), layer_idx=1).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 21, config.dim)
    position_embeddings = LlamaRotaryEmbedding(_hf_config(config))(x, torch.arange(21)[None])
    causal = torch.full((21, 21), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected, _ = theirs(x, position_embeddings, attention_mask=causal)
        got = ours(x, model.rope_cos[:21], model.rope_sin[:21])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,mask_dims", [(8, 2, 4), (6, 2, 2), (4, 4, 4)])
def test_masked_attention_folds_query_groups_without_changing_the_result(heads, kv_heads, mask_dims):
    """The decode step's attention (query heads folded onto their shared KV head) against SDPA's own
    `enable_gqa`, under a per-row mask (a slot step's: each row's own context) and a shared 2-D one."""
    torch.manual_seed(0)
    b, t, keys, d = 3, 5, 40, 16
    q, k, v = torch.randn(b, heads, t, d), torch.randn(b, kv_heads, keys, d), torch.randn(b, kv_heads, keys, d)
    if mask_dims == 4:
        positions = torch.tensor([[3, 4, 5, 6, 7], [30, 31, 32, 33, 34], [39, 39, 39, 39, 39]])
        mask = (torch.arange(keys) <= positions[:, :, None])[:, None]
    else:
        mask = torch.ones(t, keys, dtype=torch.bool).tril(diagonal=keys - t)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(masked_attention(q, k, v, mask), expected, rtol=0, atol=1e-6)


def test_decoder_layer_matches_transformers(model):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = model.config
    theirs = LlamaDecoderLayer(_hf_config(config, "sdpa"), layer_idx=0).eval()
    theirs.load_state_dict(model.layers[0].state_dict())
    x = torch.randn(1, 17, config.dim)
    position_embeddings = LlamaRotaryEmbedding(_hf_config(config))(x, torch.arange(17)[None])
    with torch.no_grad():
        expected = theirs(x, attention_mask=None, position_embeddings=position_embeddings)
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = model.layers[0](x, model.rope_cos[:17], model.rope_sin[:17])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward(model):
    tokens = torch.randint(0, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch=2, max_len=30)
        pieces = [model(tokens[:, :11], 0, cache)]                 # prefill
        for pos in range(11, 20):                                  # one token at a time
            pieces.append(model(tokens[:, pos:pos + 1], pos, cache))
        pieces.append(model(tokens[:, 20:30], 20, cache))          # a chunk after a cached prefix
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_rewrites_after_rollback(model):
    """Writing at an earlier position replaces what was there (speculative decoding relies on it)."""
    a = torch.randint(0, 512, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 512
    with torch.no_grad():
        cache = model.new_cache(1, 12)
        model(a, 0, cache)                       # fills all 12 slots with a's keys
        got = model(b[:, 8:], 8, cache)          # roll back to 8 and feed b's tail
        expected = model(b)[:, 8:]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_context_overflow_is_an_error(model):
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 9, dtype=torch.long), 0, cache)


@pytest.mark.parametrize("tied", [False, True])
def test_loss_and_grads_equal_plain_cross_entropy(tied):
    torch.manual_seed(2)
    model = Llama(micro().with_overrides(tie_embeddings=tied))
    rows = torch.randint(0, 512, (3, 25))
    loss = model.loss(rows)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_linear_cross_entropy_chunks_and_ignore_index():
    torch.manual_seed(3)
    hidden = torch.randn(2, 13, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (2, 13))
    targets[0, :5] = -100
    targets[1, 7] = -100
    got = linear_cross_entropy(hidden, weight, targets, chunk=4)   # 26 rows: 6 full chunks + 2
    got.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = F.cross_entropy((hidden @ weight.t()).flatten(0, 1), targets.flatten(), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(grads[0][0, :5] == 0)


def test_both_chunk_forms_give_the_same_loss_and_gradient():
    """The eager form (log_softmax + in-place scatter) and the form written for torch.compile
    (logsumexp + an index comparison) are two spellings of one function, ignored rows included."""
    torch.manual_seed(6)
    logits = torch.randn(12, 50) * 4
    targets = torch.randint(0, 50, (12,))
    targets[[0, 5, 11]] = -100
    scale = torch.tensor(1 / 9)
    loss_e, grad_e = _eager_chunk_loss_and_grad(logits.clone(), targets, scale)
    loss_f, grad_f = _fused_chunk_loss_and_grad(logits, targets, scale)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_f, grad_e, rtol=1e-5, atol=1e-8)
    assert torch.all(grad_f[[0, 5, 11]] == 0)
    expected = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss_f, expected, rtol=1e-6, atol=1e-5)


def test_loss_under_bf16_autocast_matches_plain_cross_entropy():
    torch.manual_seed(5)
    model = Llama(micro())
    rows = torch.randint(0, 512, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(rows)
        reference = F.cross_entropy(model(rows[:, :-1]).float().flatten(0, 1), rows[:, 1:].flatten())
    loss.backward()
    fused = model.lm_head.weight.grad.clone()
    model.zero_grad()
    reference.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused, model.lm_head.weight.grad, rtol=5e-2, atol=2e-3)


def test_loss_under_no_grad_is_the_same_loss(model):
    rows = torch.randint(0, 512, (2, 9))
    targets = rows.clone()
    targets[0, :3] = -100
    with torch.no_grad():
        loss = model.loss(rows, targets)
        expected = F.cross_entropy(model(rows).flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["compile_blocks", "compile_loss"])
def test_compiled_model_trains_like_eager(how):
    torch.manual_seed(4)
    eager = Llama(micro())
    compiled = Llama(micro())
    compiled.load_state_dict(eager.state_dict())
    getattr(compiled, how)()
    rows = torch.randint(0, 512, (2, 33))
    for m in (eager, compiled):
        m.loss(rows).backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
