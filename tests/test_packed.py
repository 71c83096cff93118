"""fp32 linear layers through oneDNN's reordered weights (model/packed.py): the same numbers as `F.linear` to
fp32 rounding, eager and compiled, a fresh reorder when the weight changes, autograd untouched, a compiled row
multiplied by inductor's own loop, and the compiled decode step on packed layers decoding the unpacked model's
greedy text."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_serving_math import PROMPTS, run_all
from torch._dynamo.utils import counters

from model.config import micro
from model.decoder import BatchDecoder
from model.llama import Llama
from model.packed import INTERLEAVED_ROWS, MIN_WEIGHTS, PackedLinear, available, one_row_linear, pack_linears
from model.sampling import Sampling

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(600),
              pytest.mark.skipif(not available(), reason="torch built without oneDNN")]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).norm() / b.norm()) < 1e-6)


def test_packed_linear_matches_f_linear_and_reorders_a_changed_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=False)
    layer = PackedLinear(linear)
    x = torch.randn(3, 5, 96)
    with torch.inference_mode():
        assert close(layer(x), F.linear(x, linear.weight))
        assert close(layer(x[0, :1]), F.linear(x[0, :1], linear.weight))  # one row, as a decode step feeds
    with torch.no_grad():
        linear.weight.mul_(-2)  # in place: same address, a new version
        assert close(layer(x), F.linear(x, linear.weight))


def test_autograd_and_other_dtypes_take_nn_linear():
    torch.manual_seed(0)
    layer = PackedLinear(torch.nn.Linear(32, 48, bias=False))
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()  # the custom op has no backward: training must not reach it
    assert x.grad is not None and layer.weight.grad is not None
    with torch.inference_mode():
        y = layer.to(torch.bfloat16)(x.detach().bfloat16())
    assert y.dtype == torch.bfloat16


def test_pack_linears_reorders_large_weights_only_and_keeps_the_state_dict():
    torch.manual_seed(0)
    names = list(Llama(micro()).state_dict())
    model = pack_linears(Llama(micro()))
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 2 * 7 + 1
    assert not any(m.reorders for m in model.modules() if isinstance(m, PackedLinear))  # micro's are all small
    assert micro().vocab_size * micro().dim < MIN_WEIGHTS
    model = pack_linears(Llama(micro()), min_weights=micro().dim * micro().mlp_dim)
    reordered = {name for name, m in model.named_modules() if isinstance(m, PackedLinear) and m.reorders}
    assert reordered == {"lm_head", *(f"layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down"))}
    assert list(model.state_dict()) == names


def test_a_compiled_row_multiplies_in_inductors_loop_not_a_library_call():
    """One row in a compiled graph: `one_row_linear`, no extern kernel (BLAS, oneDNN); two rows: the packed op."""
    torch.manual_seed(0)
    layer = PackedLinear(torch.nn.Linear(96, 200, bias=False))
    x = torch.randn(2, 1, 96)
    with torch.inference_mode():
        for rows in (1, 2):
            counters.clear()
            torch._dynamo.reset()
            y = torch.compile(layer, fullgraph=True)(x[:rows])
            assert close(y, F.linear(x[:rows], layer.weight))
            assert (counters["inductor"]["extern_calls"] > 0) == (rows > 1), (rows, dict(counters["inductor"]))


@pytest.mark.parametrize("rows", [50 * INTERLEAVED_ROWS, 50 * INTERLEAVED_ROWS + 1])
def test_interleaved_rows_give_the_same_numbers(rows):
    """A compiled row over groups of the weight's rows: each output bitwise what the one sum gives (a row count the
    groups do not divide: one sum)."""
    torch.manual_seed(0)
    weight, x = torch.randn(rows, 512), torch.randn(1, 512)
    with torch.inference_mode():
        alone = torch.compile(one_row_linear, fullgraph=True)(x, weight)
        grouped = torch.compile(one_row_linear, fullgraph=True)(x, weight, interleave=True)
    assert torch.equal(grouped, alone) and close(alone, F.linear(x, weight))


def test_compiled_packed_model_decodes_the_unpacked_text():
    """Every linear packed, continuous batching on the compiled step: the eager, unpacked engine's greedy tokens;
    the full forward's logits close to the unpacked model's."""
    torch.manual_seed(23)
    plain = Llama(micro()).eval()
    model = pack_linears(copy.deepcopy(plain), min_weights=0)
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 2 * 7 + 1
    x = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        assert close(model(x), plain(x))
    jobs = [(p, 12, Sampling()) for p in PROMPTS[:3]]
    expected = run_all(BatchDecoder(plain, 2, prefill_chunk=8), jobs)
    assert run_all(BatchDecoder(model, 2, prefill_chunk=8, compile=True), jobs) == expected
