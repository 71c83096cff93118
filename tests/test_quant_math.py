"""The math under quantization, fast: llama.cpp's q/k permutation, GGUF block quantizers' error
bounds, our int8 linear layer, and the perplexity-tool measures on distributions with known answers."""

import math

import numpy as np
import pytest
import torch

from model.config import preset
from model.gguf import block_size, permute_qk, unpermute_qk
from model.llama import Llama, apply_rope, rope_cache
from model.packed import INTERLEAVED_ROWS
from model.quant import (
    EXACT_FP32_TERMS,
    Int8Linear,
    dequantize_weight,
    int8_matmul,
    one_row_int8_product,
    quantize_int8,
    quantize_rows,
    quantize_weight,
)
from tasks.quantize.measures import KlStats, chunk

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- q/k permutation


@pytest.mark.parametrize("n_head, head_dim, cols", [(4, 8, 16), (2, 32, 64), (6, 32, 192)])
def test_permutation_round_trips(n_head, head_dim, cols):
    weight = torch.randn(n_head * head_dim, cols)
    assert torch.equal(unpermute_qk(permute_qk(weight, n_head), n_head), weight)
    assert not torch.equal(permute_qk(weight, n_head), weight)


def test_permutation_interleaves_the_rotated_halves_of_each_head():
    """Head rows [x0, x1, y0, y1] (HF: first halves, then second halves) become [x0, y0, x1, y1]."""
    rows = torch.arange(2 * 4).float()[:, None]  # two heads of head_dim 4
    assert permute_qk(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ggml's (GPT-J style) RoPE: rotate the adjacent pairs (x[2i], x[2i+1]) by angle i."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)


def test_permuted_projection_with_ggml_rope_equals_hf_rope_then_permute():
    """What the permutation is for: llama.cpp applies interleaved RoPE to the permuted projection,
    and must get our (rotate-half) rotated queries, in its order."""
    config = preset("micro")
    n_head, head_dim = config.n_head, config.head_dim
    weight, x = torch.randn(config.dim, config.dim), torch.randn(5, config.dim)
    cos, sin = rope_cache(config, 5)
    ours = apply_rope((x @ weight.T).view(5, n_head, head_dim).transpose(0, 1), cos, sin)
    ggml = _rope_interleaved((x @ permute_qk(weight, n_head).T).view(5, n_head, head_dim).transpose(0, 1), cos, sin)
    ours_in_ggml_order = permute_qk(ours.transpose(0, 1).reshape(5, -1).T, n_head).T
    torch.testing.assert_close(ggml.transpose(0, 1).reshape(5, -1), ours_in_ggml_order, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------- GGUF block quantizers (gguf-py, llama.cpp's reference)


@pytest.mark.parametrize("qtype, levels", [("Q8_0", 127), ("Q5_0", 16), ("Q4_0", 8)])
def test_block_quantization_error_is_within_half_a_step(qtype, levels):
    """Each block of 32 gets one fp16 scale d = max|x| / levels, the block's largest weight mapping to
    code ±levels. A weight is within d/2 of its code (plus the fp16 rounding of d), except that Q4_0/Q5_0
    codes run -levels..levels-1: a weight of the other sign near max|x| clips, off by at most d."""
    import gguf

    rng = np.random.default_rng(0)
    data = (rng.standard_normal((16, 128)) * rng.uniform(0.01, 2, (16, 1))).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    back = gguf.quants.dequantize(gguf.quants.quantize(data, kind), kind)
    assert back.shape == data.shape and block_size(qtype) == 32
    blocks, restored = data.reshape(-1, 32), back.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    step = amax / levels
    error = np.abs(restored - blocks)
    slack = amax * 2.0 ** -10
    unclipped = np.abs(blocks) <= amax * (levels - 1) / levels
    assert np.all(error[unclipped] <= np.broadcast_to(step / 2 + slack, error.shape)[unclipped])
    assert np.all(error <= step + slack)
    # The block's largest weight is exactly a code (±levels steps): only the fp16 rounding of d is left on it.
    largest = np.abs(blocks).argmax(axis=1)
    assert np.all(error[np.arange(len(blocks)), largest] <= slack[:, 0])
    assert error.mean() > slack.mean()  # the others do lose precision: it quantizes


def test_f16_has_block_size_one():
    assert block_size("F16") == 1


# ---------------------------------------------------------------- int8 for our engine


def test_int8_weight_rounding_is_exact_to_half_a_step():
    weight = torch.randn(96, 64) * torch.rand(96, 1)
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and int(q.abs().max()) <= 127
    assert torch.all((dequantize_weight(q, scale) - weight).abs() <= scale.float()[:, None] / 2 + 1e-7)
    assert torch.all(scale.float() * 127 >= weight.abs().amax(1))  # rounded up: nothing clipped


def test_int8_linear_matches_float_within_tolerance():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    x = torch.randn(3, 7, 256)
    layer = Int8Linear.from_linear(linear)
    with torch.no_grad():
        expected = linear(x)
        exact = x @ dequantize_weight(layer.weight, layer.scale).T
    got = layer(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert ((got - expected).norm() / expected.norm()) < 0.02   # int8 weights + int8 activations
    # the int8 activations alone: per-row steps of max|x| / 127, ~0.0066 relative for 256 Gaussian entries
    assert ((got - exact).norm() / exact.norm()) < 0.009


def test_int8_activations_are_rounded_per_row_to_half_a_step():
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 2.0])[:, None]
    rows, scale = quantize_rows(x)
    assert rows.dtype == torch.int8 and scale.shape == (5, 1) and int(rows.abs().max()) == 127
    assert torch.all((rows.float() * scale - x).abs() <= scale / 2 * (1 + 1e-6))
    assert torch.equal(rows[3], torch.zeros(64, dtype=torch.int8))  # an all-zero row stays zero, no NaN


def test_int8_matmul_on_cpu_is_the_exact_integer_product_and_each_row_its_own():
    """The CPU path multiplies int8 rows by int8 weights in integers: the result is the float64 product of the
    rounded operands up to fp32 rounding, and a row's output does not depend on the rows beside it (batching
    changes no number: a sequence decodes the same text alone or in a full step)."""
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(48, 320))
    x = torch.randn(9, 320)
    got = int8_matmul(x, q, scale)
    rows, row_scale = quantize_rows(x)
    exact = (rows.double() @ q.double().T) * row_scale.double() * scale.double()
    assert torch.allclose(got.double(), exact, rtol=1e-6, atol=0)
    assert all(torch.equal(int8_matmul(x[i:i + 1], q, scale), got[i:i + 1]) for i in range(9))


@pytest.mark.parametrize("k", [320, EXACT_FP32_TERMS, 1408, 5632])
def test_one_row_in_fp32_is_the_integer_product_even_at_the_extremes(k):
    """Products at or near ±127², odd, all of one sign: the largest sums fp32 has to hold, which would round at
    every addition past 2^24. One chunk up to `EXACT_FP32_TERMS`, several past it (the 55M's down projection: 1408;
    the 1.1B's: 5632), eager and compiled; weights whose rows split into `INTERLEAVED_ROWS` groups and one whose
    rows do not."""
    torch.manual_seed(0)
    weight = torch.full((2 * INTERLEAVED_ROWS, k), 127, dtype=torch.int8)
    weight[1] = -127
    weight[2:4] = 125 + 2 * torch.randint(0, 2, (2, k), dtype=torch.int8)
    weight[4:] = torch.randint(-127, 128, (len(weight) - 4, k), dtype=torch.int8)
    rows = torch.full((1, k), 127.0)
    rows[0, ::3] = -127.0
    compiled = torch.compile(one_row_int8_product, fullgraph=True)
    for row in (rows, torch.full((1, k), -127.0), torch.randint(-127, 128, (1, k)).float()):
        for w in (weight, weight[:-1]):
            expected = torch._int_mm(row.to(torch.int8), w.t()).float()
            assert torch.equal(one_row_int8_product(row, w), expected)
            assert torch.equal(compiled(row, w), expected)


def test_a_compiled_row_gets_the_numbers_it_gets_in_a_batch():
    """A looped layer's compiled step of one row multiplies in its own loop, a batch through `torch._int_mm`: the same
    numbers, so a sequence decodes the same text alone or beside others."""
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(320, 1408))
    x = torch.randn(4, 1408) * torch.tensor([1e-3, 1.0, 30.0, 0.0])[:, None]
    batch = int8_matmul(x, q, scale, looped=True)
    compiled = torch.compile(int8_matmul, fullgraph=True)
    assert all(torch.equal(compiled(x[i:i + 1], q, scale, True), batch[i:i + 1]) for i in range(4))


def test_only_a_model_larger_than_caches_loops_its_one_row_steps():
    assert all(not layer.looped for layer in quantize_int8(Llama(preset("tiny"))).modules()
               if isinstance(layer, Int8Linear))
    assert all(layer.looped for layer in quantize_int8(Llama(preset("bench-55m"))).modules()
               if isinstance(layer, Int8Linear))


def test_quantize_int8_replaces_every_linear_and_decodes():
    from model.generate import generate

    torch.manual_seed(0)
    model = Llama(preset("micro")).eval()
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        expected = model(x)
    fp32_tokens = generate(model, [1, 5, 9], max_new_tokens=8)
    attention = model.layers[0].self_attn
    separate = [quantize_weight(layer.weight) for layer in (attention.q_proj, attention.k_proj, attention.v_proj)]
    quantize_int8(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # per layer: q/k/v grouped, o, gate/up grouped, down; and the head
    assert not linears and sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * 2 + 1
    assert torch.equal(attention.qkv.weight, torch.cat([q for q, _ in separate]))  # grouping changes no number
    assert torch.equal(attention.qkv.scale, torch.cat([s for _, s in separate]))
    with torch.no_grad():
        got = model(x)
    assert ((got - expected).norm() / expected.norm()) < 0.02
    assert model.new_cache(1, 8).k.dtype == torch.float32
    assert len(generate(model, [1, 5, 9], max_new_tokens=8)) == len(fp32_tokens)


# ---------------------------------------------------------------- llama.cpp's perplexity measures


def test_identical_distributions_give_ratio_one_no_divergence_same_top():
    logits = torch.randn(50, 32)
    targets = torch.randint(0, 32, (50,))
    stats = KlStats()
    stats.add(logits, logits.clone(), targets)
    out = stats.summary()
    assert out["ppl_ratio"] == pytest.approx(1.0) and out["kld"] == pytest.approx(0.0, abs=1e-12)
    assert out["same_top"] == 1.0 and out["rms_dp"] == pytest.approx(0.0, abs=1e-12)


def test_known_pair_of_distributions():
    """P = (1/2, 1/2), Q = (3/4, 1/4), the next token is 0: KL(P||Q) = ln(4/3)/2, PPL(Q)/PPL(P) = (1/.75)/2,
    both tops token 0 (ties go to the first), Δp = 3/4 - 1/2."""
    base = torch.tensor([[0.0, 0.0]] * 20)
    quant = torch.tensor([[math.log(3), 0.0]] * 20)
    stats = KlStats()
    stats.add(base, quant, torch.zeros(20, dtype=torch.long))
    out = stats.summary()
    assert out["kld"] == pytest.approx(0.5 * math.log(4 / 3))
    assert out["ppl_ratio"] == pytest.approx((1 / 0.75) / 2)
    assert out["ppl_base"] == pytest.approx(2.0) and out["ppl"] == pytest.approx(4 / 3)
    assert out["same_top"] == 1.0 and out["rms_dp"] == pytest.approx(0.25)
    assert out["kld_unc"] == pytest.approx(0.0, abs=1e-12)  # every position alike


def test_uncertainties_follow_llama_cpp_formulas():
    torch.manual_seed(1)
    base, quant = torch.randn(400, 16), torch.randn(400, 16) * 0.3
    targets = torch.randint(0, 16, (400,))
    stats = KlStats()
    stats.add(base[:150], base[:150] + quant[:150], targets[:150])  # accumulates over chunks
    stats.add(base[150:], base[150:] + quant[150:], targets[150:])
    out = stats.summary()
    logp, logq = torch.log_softmax(base.double(), -1), torch.log_softmax((base + quant).double(), -1)
    kld = (logp.exp() * (logp - logq)).sum(-1).numpy()
    nll_q = -logq.gather(1, targets[:, None]).squeeze(1).numpy()
    nll_p = -logp.gather(1, targets[:, None]).squeeze(1).numpy()
    n = 400
    assert out["kld"] == pytest.approx(kld.mean())
    assert out["kld_unc"] == pytest.approx(kld.std() / math.sqrt(n - 1))
    diff = nll_q - nll_p
    assert out["ppl_ratio"] == pytest.approx(math.exp(diff.mean()))
    assert out["ppl_ratio_unc"] == pytest.approx(math.exp(diff.mean()) * diff.std() / math.sqrt(n - 1), rel=1e-6)
    same = float((base.argmax(-1) == (base + quant).argmax(-1)).float().mean())
    assert out["same_top"] == pytest.approx(same)
    assert out["same_top_unc"] == pytest.approx(math.sqrt(same * (1 - same) / (n - 1)))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        KlStats().add(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))


def test_chunk_puts_bos_first_and_scores_the_second_half():
    tokens, first = chunk(np.arange(10, 30), 16, bos_id=1)
    assert tokens[0] == 1 and tokens[1:] == list(range(11, 26)) and first == 8
