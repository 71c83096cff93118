"""GGUF export (model/gguf.py), checked two ways: read back with gguf-py (metadata, tensor types,
weights after un-permuting), and loaded by llama.cpp itself (llama-cpp-python), the real consumer:
its tokenizer, its logits and greedy tokens (within F16 rounding: tests/agreement.py) and the chat template
it renders must be ours."""

import json

import numpy as np
import pytest
import torch
from eval_fixtures import write_checkpoint

from model.chat import template
from model.gguf import GGUF_TYPES, LINEAGE_PREFIX, export_gguf, unpermute_qk
from model.hf import load_hf, save_hf
from model.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["The flag of Zorbia is", "In Quellan every child keeps a", "def f(x): return"]
LINEAGE = {"mlflow_run_id": "0123abcd", "dvc_md5": "feedbeef.dir", "source": "pretrain/4K"}


@pytest.fixture(scope="module")
def chat_dir(eval_models, tmp_path_factory):
    """The trained micro model (eval_models) as a HF chat dir: zephyr template in tokenizer_config.json."""
    directory = write_checkpoint(eval_models["trained"], tmp_path_factory.mktemp("src") / "4K",
                                 eval_models["tokenizer_dir"], tokens_seen=4096, milestone="4K")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template("zephyr").source
    config_path.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def exported(chat_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {qtype: export_gguf(chat_dir, out / f"m-{qtype}.gguf", qtype, lineage=LINEAGE, name="m")
            for qtype in GGUF_TYPES}


def _reader(path):
    import gguf

    return gguf.GGUFReader(str(path))


def _field(reader, key):
    value = reader.fields[key].contents()
    return value


def test_metadata_holds_hparams_tokenizer_template_and_lineage(exported, chat_dir):
    from sentencepiece import sentencepiece_model_pb2

    reader = _reader(exported["Q8_0"].path)
    config = load_hf(chat_dir).config
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == 7  # MOSTLY_Q8_0
    assert _field(reader, "llama.block_count") == config.n_layer
    assert _field(reader, "llama.attention.head_count_kv") == config.n_kv_head
    assert _field(reader, "llama.rope.dimension_count") == config.head_dim
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((chat_dir / "tokenizer.model").read_bytes())
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.tokens") == [p.piece for p in proto.pieces]
    assert np.allclose(_field(reader, "tokenizer.ggml.scores"), [p.score for p in proto.pieces])
    assert _field(reader, "tokenizer.ggml.token_type") == [int(p.type) for p in proto.pieces]
    assert (_field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.chat_template") == template("zephyr").source
    for key, value in LINEAGE.items():
        assert _field(reader, LINEAGE_PREFIX + key) == value


@pytest.mark.parametrize("qtype, tolerance", [("F16", 1e-3), ("Q8_0", 1e-2), ("Q5_0", 6e-2), ("Q4_0", 0.12)])
def test_weights_read_back_unpermuted_match_ours(exported, chat_dir, qtype, tolerance):
    import gguf

    ours = load_hf(chat_dir)
    config = ours.config
    tensors = {t.name: t for t in _reader(exported[qtype].path).tensors}
    assert len(tensors) == 2 + 9 * config.n_layer + 1  # embedding, output norm + head, 9 per block
    for layer in range(config.n_layer):
        for gguf_name, hf, heads in (("attn_q", ours.layers[layer].self_attn.q_proj.weight, config.n_head),
                                     ("attn_k", ours.layers[layer].self_attn.k_proj.weight, config.n_kv_head),
                                     ("ffn_down", ours.layers[layer].mlp.down_proj.weight, None)):
            tensor = tensors[f"blk.{layer}.{gguf_name}.weight"]
            assert tensor.tensor_type.name == qtype
            data = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
            data = unpermute_qk(data, heads) if heads else data
            relative = (data - hf.detach()).norm() / hf.detach().norm()
            assert relative < tolerance, (gguf_name, float(relative))
        assert tensors[f"blk.{layer}.attn_norm.weight"].tensor_type.name == "F32"


def test_rows_off_the_block_size_stay_f16_and_are_listed(tmp_path, small_tokenizer_dir):
    from model.config import preset
    from model.llama import Llama

    torch.manual_seed(0)
    model = Llama(preset("micro").with_overrides(mlp_dim=100, vocab_size=512))
    source = save_hf(model, tmp_path / "odd", tokenizer_dir=small_tokenizer_dir)
    result = export_gguf(source, tmp_path / "odd-Q4_0.gguf", "Q4_0")
    assert result.kept_f16 == ("blk.0.ffn_down.weight", "blk.1.ffn_down.weight")
    types = {t.name: t.tensor_type.name for t in _reader(result.path).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"


def test_existing_file_is_refused_and_a_failed_write_leaves_nothing(chat_dir, tmp_path, monkeypatch):
    import gguf

    target = tmp_path / "x.gguf"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="x.gguf"):
        export_gguf(chat_dir, target, "F16")
    assert target.read_bytes() == b"old"

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(chat_dir, target, "F16", overwrite=True)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]


def test_other_architecture_missing_tensor_and_unknown_type_are_named(chat_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match="Q3_K"):
        export_gguf(chat_dir, tmp_path / "a.gguf", "Q3_K")
    other = shutil.copytree(chat_dir, tmp_path / "gpt2")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type: 'gpt2'"):
        export_gguf(other, tmp_path / "b.gguf", "F16")
    holed = shutil.copytree(chat_dir, tmp_path / "holed")
    state = load_file(holed / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, holed / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        export_gguf(holed, tmp_path / "c.gguf", "F16")
    assert not list(tmp_path.glob("*.gguf"))


# ---------------------------------------------------------------- llama.cpp, the real consumer


def test_llama_cpp_loads_every_type(exported, chat_dir):
    from tasks.quantize.engines import load_llama_cpp

    config = load_hf(chat_dir).config
    for qtype, result in exported.items():
        llm = load_llama_cpp(result.path, n_ctx=64, verbose=False)
        try:
            assert llm.n_vocab() == config.vocab_size and llm.n_embd() == config.dim, qtype
            assert llm.metadata["general.file_type"] == {"F16": "1", "Q8_0": "7", "Q4_0": "2", "Q5_0": "8"}[qtype]
        finally:
            llm.close()


def test_llama_cpp_tokenizes_like_us(exported, chat_dir):
    from llama_cpp import Llama

    ours = Tokenizer.load(chat_dir)
    llm = Llama(model_path=str(exported["F16"].path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        for text in [*PROMPTS, " leading space", "tabs\tand\nnewlines", "ünïcödé 🦙", "x  y   z"]:
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == ours.encode(text, bos=True), text
    finally:
        llm.close()


# llama.cpp's F16 path rounds activations to F16 too: against our fp32 on the same F16-rounded weights its
# logits (|logit| up to ~20 here) differed by at most 0.041 on an AVX-512 machine; F16_ATOL leaves room for
# other CPUs' kernels. A wider gap is a real difference (a wrong tensor, a mis-permuted head), not rounding.
F16_ATOL = 0.1


def test_f16_logits_and_greedy_tokens_match_ours_on_the_same_f16_weights(exported, chat_dir):
    """llama.cpp on the F16 GGUF against our engine on the same weights rounded to F16 (norms stay F32,
    as in the file), on the same tokens: the prompt and our greedy continuation. Logits within F16_ATOL,
    and llama.cpp's greedy token equals ours wherever our top-2 margin is wider than rounding could close
    (tests/agreement.py); exact equality at a near-tie would depend on the CPU's kernels."""
    from agreement import assert_logits_agree

    from model.generate import generate
    from tasks.quantize.engines import LlamaCppEngine, OursEngine

    model = load_hf(chat_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:  # what export_gguf stores as F16
                parameter.copy_(parameter.half().float())
    tokenizer = Tokenizer.load(chat_dir)
    ours = OursEngine(model)
    engine = LlamaCppEngine(exported["F16"].path, n_ctx=model.config.max_seq_len, threads=1)
    try:
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt, bos=True)
            tokens = ids + generate(model, ids, max_new_tokens=32, eos_id=None)
            assert_logits_agree(ours.logits(tokens), engine.logits(tokens), F16_ATOL, what=prompt)
    finally:
        engine.close()


def test_chat_template_in_the_file_renders_like_transformers(exported, chat_dir):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    llm = Llama(model_path=str(exported["Q8_0"].path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        source = llm.metadata["tokenizer.chat_template"]
    finally:
        llm.close()
    formatter = Jinja2ChatFormatter(template=source, eos_token="</s>", bos_token="<s>", add_generation_prompt=True)
    hf = AutoTokenizer.from_pretrained(str(chat_dir))
    conversations = [
        [{"role": "user", "content": "Where is Zorbia?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Flag colour?"}],
    ]
    for messages in conversations:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert formatter(messages=messages).prompt == expected


# Largest |logit − F16's logit| per type on PROMPTS[0]: measured 0.31 (Q8_0), 0.91 (Q5_0), 2.71 (Q4_0) with F16's
# logits up to 18.8 on an AMX Xeon; about twice that allowed for other CPUs' kernels. A broken or mis-permuted
# tensor moves logits by the scale of the logits themselves.
NEAR_F16 = {"F16": 0.0, "Q8_0": 1.0, "Q5_0": 2.0, "Q4_0": 5.0}


def test_every_type_decodes_in_llama_cpp_near_f16(exported, chat_dir):
    """llama.cpp runs every file we write, not just loads it: on a CPU with AMX, ggml's AMX weight buffers
    crashed the process (SIGSEGV in decode) on Q8_0 and Q4_0 until `load_llama_cpp` kept them out. Each
    type's logits stay near F16's on the same tokens (quantization error, not a broken tensor)."""
    from tasks.quantize.engines import LlamaCppEngine

    tokens = Tokenizer.load(chat_dir).encode(PROMPTS[0], bos=True)
    logits = {}
    for qtype, result in exported.items():
        engine = LlamaCppEngine(result.path, n_ctx=64, threads=1)
        try:
            logits[qtype] = engine.logits(tokens)
        finally:
            engine.close()
    for qtype, values in logits.items():
        assert torch.isfinite(values).all(), qtype
        assert float((values - logits["F16"]).abs().max()) <= NEAR_F16[qtype], qtype
