"""model/hf.py: our checkpoints are HF Llama dirs that transformers loads with our logits, and
HF dirs (single-file or sharded) load into our model bit for bit."""

import json

import pytest
import torch
from agreement import assert_logits_agree
from safetensors.torch import load_file

from model.config import micro
from model.generate import generate
from model.hf import config_from_hf, config_to_hf, load_hf, save_hf
from model.llama import Llama

pytestmark = pytest.mark.usefixtures("single_thread")


def _hf_model(directory):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _random_hf(tied: bool):
    """A transformers LlamaForCausalLM with transformers' own random init (not ours)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    return LlamaForCausalLM(HFConfig(**config_to_hf(micro().with_overrides(tie_embeddings=tied)))).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(tmp_path, tied):
    torch.manual_seed(6)
    ours = Llama(micro().with_overrides(tie_embeddings=tied)).eval()
    save_hf(ours, tmp_path / "ckpt", metadata={"milestone": "100K", "step": 13})
    theirs = _hf_model(tmp_path / "ckpt")
    assert theirs.config.tie_word_embeddings is tied
    tokens = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff <= 1e-4

    # Greedy: on the prompt plus our greedy continuation, transformers' top token is ours wherever the
    # margin is wider than the tolerance could close (tests/agreement.py: no coin toss at near-ties).
    prompt = [1, 17, 250, 31, 400]
    tokens = torch.tensor([prompt + generate(ours, prompt, max_new_tokens=24, temperature=0.0, eos_id=None)])
    with torch.no_grad():
        assert_logits_agree(ours(tokens)[0], theirs(tokens).logits[0], 1e-4, what="transformers vs ours")


def test_training_gradients_match_transformers(tmp_path):
    """One training step's loss and every gradient equal transformers' (the fused QKV projection and
    chunked loss of the training path included)."""
    import torch.nn.functional as F

    torch.manual_seed(7)
    ours = Llama(micro()).train()
    save_hf(ours, tmp_path / "ckpt")
    theirs = _hf_model(tmp_path / "ckpt").train()
    rows = torch.randint(0, 512, (2, 33))
    ours.loss(rows).backward()
    reference = F.cross_entropy(theirs(input_ids=rows[:, :-1]).logits.flatten(0, 1), rows[:, 1:].flatten())
    reference.backward()
    with torch.no_grad():
        torch.testing.assert_close(ours.loss(rows), reference.detach(), rtol=0, atol=1e-5)
    hf_grads = {name.removeprefix("model."): p.grad for name, p in theirs.named_parameters()}
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, hf_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_export_writes_the_contract_files(tmp_path, small_tokenizer_dir):
    model = Llama(micro())
    out = save_hf(model, tmp_path / "models" / "pretrain" / "100K", tokenizer_dir=small_tokenizer_dir,
                  metadata={"milestone": "100K", "milestone_tokens": 100000, "tokens_seen": 106496, "step": 13})
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tinyllama"]["tokens_seen"] == 106496
    assert (config["rope_theta"], config["rms_norm_eps"], config["torch_dtype"]) == (10000.0, 1e-5, "float32")
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert (out / "tokenizer.model").read_bytes() == (small_tokenizer_dir / "tokenizer.model").read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["100K"]  # no temp dirs left behind


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_hf_ours_hf_is_bitwise_exact(tmp_path, tied):
    original = _random_hf(tied)
    original.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.config == config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    save_hf(ours, tmp_path / "back")
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype
        assert torch.equal(before[name], after[name]), name
    again = _hf_model(tmp_path / "back")
    for (name, a), b in zip(original.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_sharded_transformers_dir_loads(tmp_path):
    original = _random_hf(tied=False)
    original.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    ours = load_hf(tmp_path / "hf")
    tokens = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert (ours(tokens) - original(tokens).logits).abs().max() <= 1e-4


def test_load_casts_to_the_requested_dtype(tmp_path):
    save_hf(Llama(micro()).to(torch.bfloat16), tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_hf(tmp_path / "bf16", dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_missing_weights_name_the_file_and_pickles_are_never_loaded(tmp_path):
    save_hf(Llama(micro()), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").rename(tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="model.safetensors: missing"):
        load_hf(tmp_path / "ckpt")


def test_missing_or_misshapen_tensors_are_named(tmp_path):
    from safetensors.torch import save_file

    save_hf(Llama(micro()), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        load_hf(tmp_path / "ckpt")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight has shape"):
        load_hf(tmp_path / "ckpt")


@pytest.mark.parametrize("change, field", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters.rope_type"),
    ({"head_dim": 32}, "head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
    ({"num_attention_heads": 5}, "model.n_head"),
])
def test_unsupported_hf_configs_are_refused_by_field(change, field):
    hf = config_to_hf(micro())
    hf.update(change)
    with pytest.raises(ValueError, match=field):
        config_from_hf(hf)


def test_legacy_config_schema_reads_the_same():
    hf = config_to_hf(micro().with_overrides(rope_base=1234.0))
    legacy = {k: v for k, v in hf.items() if k not in ("rope_parameters", "dtype")}
    assert config_from_hf(legacy) == config_from_hf(hf) == micro().with_overrides(rope_base=1234.0)


def test_save_replaces_an_existing_dir_and_a_failed_save_keeps_the_old_one(tmp_path):
    first, second = Llama(micro()), Llama(micro())
    target = tmp_path / "ckpt"
    save_hf(first, target, metadata={"step": 1})
    save_hf(second, target, metadata={"step": 2})
    assert json.loads((target / "config.json").read_text())["tinyllama"] == {"step": 2}
    assert torch.equal(load_hf(target).lm_head.weight, second.lm_head.weight)

    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    with pytest.raises(ValueError, match="tokenizer_dir"):
        save_hf(first, target, tokenizer_dir=empty, metadata={"step": 3})
    assert json.loads((target / "config.json").read_text())["tinyllama"] == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "no-tokenizer"]
