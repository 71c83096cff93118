"""params.yaml validation: every bad field named, before anything runs."""

import copy

import pytest
import yaml

from tasks.errors import UserError
from tasks.params import format_tokens, load_params, parse_params, parse_tokens


@pytest.fixture
def raw():
    with open("params.yaml") as f:
        return yaml.safe_load(f)


def test_default_and_cluster_profiles_validate():
    tiny = load_params("params.yaml")
    big = load_params("configs/tinyllama-1.1b.yaml")
    assert tiny.llama_config().num_params() < 10_000_000
    assert big.llama_config().num_params() == 1_100_048_384
    assert big.grad_accum == 8


@pytest.mark.parametrize("text,tokens", [
    ("105B", 105_000_000_000), ("1.5T", 1_500_000_000_000), ("500K", 500_000), (4096, 4096), ("3T", 3 * 10**12),
])
def test_parse_tokens(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("tokens,text", [
    (105_000_000_000, "105B"), (1_500_000_000_000, "1.5T"), (100_000, "100K"), (1_048_576, "1048.576K"), (999, "999"),
])
def test_format_tokens_is_exact(tokens, text):
    assert format_tokens(tokens) == text
    assert parse_tokens(text) == tokens


def _error(raw) -> str:
    with pytest.raises(UserError) as info:
        parse_params(raw)
    return str(info.value)


def test_every_bad_field_is_named_in_one_error(raw):
    raw["train"]["lr"] = -1
    raw["data"]["seq_len"] = "long"
    raw["model"]["bogus"] = 1
    message = _error(raw)
    assert "train.lr" in message and "data.seq_len" in message and "model.bogus" in message
    assert "3 invalid field(s)" in message


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r["model"].update(preset="gpt-9"), "model.preset: unknown preset 'gpt-9'"),
    (lambda r: r["model"].update(overrides={"n_head": 5}), "model.n_head: 5 does not divide model.dim=192"),
    (lambda r: r["model"].update(overrides={"n_kv_head": 4}), "model.n_kv_head: 4 does not divide model.n_head=6"),
    (lambda r: r["train"].update(milestones=["500K", "100K"]), "milestones must increase: 100K follows 500K"),
    (lambda r: r["train"].update(global_batch_tokens=1000), "train.global_batch_tokens (1000) is not divisible"),
    (lambda r: r["train"].update(milestones=["2M"]), "exceeds train.total_tokens"),
    (lambda r: r["data"]["sources"].append(dict(r["data"]["sources"][0])), "duplicate source name 'builtin-text'"),
    (lambda r: r["data"]["sources"][0].update(weight=0), "data.sources.0.weight"),
    (lambda r: r["tokenizer"].update(train_sources=["nope"]), "tokenizer.train_sources: 'nope'"),
    (lambda r: r["data"].update(seq_len=1024), "data.seq_len (1024) exceeds the model's max_seq_len (256)"),
    (lambda r: r["tokenizer"].update(kind="pretrained", model_file=None), "tokenizer.model_file is required"),
])
def test_bad_values_are_named(raw, mutate, needle):
    raw = copy.deepcopy(raw)
    mutate(raw)
    assert needle in _error(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(bad)
