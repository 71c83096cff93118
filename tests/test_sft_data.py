"""Chat data in: the public layouts (real samples from ../shared/assets/sft where present), local
files, globs and s3://, every bad row counted by reason, the bad-fraction limit, the tiny profile's
world chat data held out from every eval item, and the tokenized examples' length policy."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tasks.errors import UserError
from tasks.params import ChatSourceParams
from tasks.sft.formats import BadRow, Preference, alpaca_row, messages_row, oasst_row, preference_row
from tasks.sft.reading import check_bad_fraction, read_source

ROOT = Path(__file__).resolve().parents[1]
SFT_ASSETS = ROOT.parent / "shared" / "assets" / "sft"
needs_assets = pytest.mark.skipif(not SFT_ASSETS.is_dir(), reason="../shared/assets absent")

ULTRACHAT_ROW = {"prompt": "How do bees make honey?", "prompt_id": "abc",
                 "messages": [{"role": "user", "content": "How do bees make honey?"},
                              {"role": "assistant", "content": "They collect nectar and evaporate it."},
                              {"role": "user", "content": "How long does it take?"},
                              {"role": "assistant", "content": "A few days."}]}
ULTRAFEEDBACK_ROW = {"prompt": "Name a primary colour.", "prompt_id": "p1",
                     "chosen": [{"role": "user", "content": "Name a primary colour."},
                                {"role": "assistant", "content": "Red."}],
                     "rejected": [{"role": "user", "content": "Name a primary colour."},
                                  {"role": "assistant", "content": "Green."}],
                     "score_chosen": 9.0, "score_rejected": 3.0}


def _source(name="s", **fields) -> ChatSourceParams:
    return ChatSourceParams(name=name, **fields)


def _write_jsonl(path: Path, rows, opener=open) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


# ---------------------------------------------------------------- one row per layout


def test_messages_row_is_the_conversation():
    assert messages_row(ULTRACHAT_ROW) == tuple(ULTRACHAT_ROW["messages"])


def test_alpaca_joins_instruction_and_input_like_llamafactory():
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour",
           "system": "Be terse.", "history": [["Hi", "Hello!"]]}
    assert alpaca_row(row) == ({"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Translate to French.\nGood morning"},
                               {"role": "assistant", "content": "Bonjour"})
    assert alpaca_row({"instruction": "Say hi.", "input": "", "output": "Hi"})[0]["content"] == "Say hi."


def test_oasst_tree_follows_the_best_ranked_live_reply():
    tree = {"prompt": {"role": "prompter", "text": "Q1", "replies": [
        {"role": "assistant", "text": "worse", "rank": 1, "replies": []},
        {"role": "assistant", "text": "deleted best", "rank": 0, "deleted": True, "replies": []},
        {"role": "assistant", "text": "unranked", "rank": None, "replies": []},
        {"role": "assistant", "text": "A1", "rank": 0, "replies": [
            {"role": "prompter", "text": "Q2", "replies": [
                {"role": "assistant", "text": "A2", "rank": 0, "replies": [
                    {"role": "prompter", "text": "unanswered", "replies": []}]}]}]}]}}
    assert [m["content"] for m in oasst_row(tree)] == ["Q1", "A1", "Q2", "A2"]


def test_preference_strips_the_repeated_prompt():
    pair = preference_row(ULTRAFEEDBACK_ROW)
    assert pair == Preference(({"role": "user", "content": "Name a primary colour."},),
                              ({"role": "assistant", "content": "Red."},),
                              ({"role": "assistant", "content": "Green."},))
    assert preference_row({"prompt": "Q?", "chosen": "yes", "rejected": "no"}).chosen[0]["content"] == "yes"


@pytest.mark.parametrize("parse, row, reason", [
    (messages_row, {"text": "no messages"}, "missing_field"),
    (messages_row, {"messages": [{"role": "user", "content": "only a question"}]}, "no_assistant_turn"),
    (messages_row, {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     "roles_out_of_order"),
    (messages_row, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "empty_content"),
    (alpaca_row, {"instruction": "x", "input": "", "output": "   "}, "empty_content"),
    (alpaca_row, {"instruction": "x"}, "missing_field"),
    (oasst_row, {"prompt": {"role": "prompter", "text": "Q", "replies": []}}, "no_assistant_turn"),
    (preference_row, {**ULTRAFEEDBACK_ROW, "rejected": ULTRAFEEDBACK_ROW["chosen"]}, "chosen_equals_rejected"),
    (preference_row, {"prompt": "Q", "chosen": [{"role": "user", "content": "Q"}], "rejected": "no"},
     "no_assistant_turn"),
])
def test_bad_rows_name_their_reason(parse, row, reason):
    with pytest.raises(BadRow) as caught:
        parse(row)
    assert caught.value.reason == reason


# ---------------------------------------------------------------- sources: files, globs, s3


@needs_assets
@pytest.mark.parametrize("file, fmt, rows", [("stanford_alpaca_first200.json", "alpaca", 200),
                                             ("llamafactory_alpaca_en_demo.json", "alpaca", 999),
                                             ("oasst_en_100_tree.jsonl", "oasst", 100)])
def test_real_public_samples_read_without_bad_rows(file, fmt, rows):
    read = read_source(_source(format=fmt, uri=str(SFT_ASSETS / file)), "sft.variants[v].sources[s]", None)
    assert read.rows == rows and len(read.examples) == rows and not read.skipped
    assert all(example[-1]["role"] == "assistant" for example in read.examples)
    assert len(read.inputs) == 1 and len(next(iter(read.inputs.values()))) == 64


def test_glob_of_compressed_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_jsonl(tmp_path / "chat" / "train-0.jsonl.gz", [ULTRACHAT_ROW] * 3, opener=gzip.open)
    _write_jsonl(tmp_path / "chat" / "train-1.jsonl", [ULTRACHAT_ROW, "{not json", {"messages": []}])
    pq.write_table(pa.Table.from_pylist([ULTRACHAT_ROW] * 2), tmp_path / "chat" / "train-2.parquet")
    read = read_source(_source(format="messages", uri=str(tmp_path / "chat" / "train-*")), "f", None)
    assert (read.rows, len(read.examples)) == (8, 6)
    assert dict(read.skipped) == {"malformed_json": 1, "not_a_list": 1}
    assert sorted(Path(uri).name for uri in read.inputs) == ["train-0.jsonl.gz", "train-1.jsonl", "train-2.parquet"]
    limited = read_source(_source(format="messages", uri=str(tmp_path / "chat"), limit=4), "f", None)
    assert limited.rows == 4 and len(limited.inputs) == 2


def test_preference_source_from_s3(s3_env, tmp_path):
    import boto3

    boto3.client("s3").create_bucket(Bucket="prefs")
    body = "\n".join(json.dumps(ULTRAFEEDBACK_ROW) for _ in range(4)) + "\n"
    boto3.client("s3").put_object(Bucket="prefs", Key="ultrafeedback/train_prefs.jsonl", Body=body.encode())
    read = read_source(_source(format="preference", uri="s3://prefs/ultrafeedback/"), "f", None, preference=True)
    assert len(read.examples) == 4 and list(read.inputs) == ["s3://prefs/ultrafeedback/train_prefs.jsonl"]


def test_unusable_sources_are_user_errors_naming_the_field(tmp_path):
    field = "sft.variants[chat].sources[ultrachat]"
    with pytest.raises(UserError, match=r"^sft.variants\[chat\].sources\[ultrachat\].uri: file not found"):
        read_source(_source(format="messages", uri=str(tmp_path / "missing.jsonl")), field, None)
    alpaca = _write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "input": "", "output": "b"}] * 3)
    with pytest.raises(UserError, match=r"\.format: no row of .* is a 'messages' example "
                                        r"\(3 of 3 rows: missing_field\)"):
        read_source(_source(format="messages", uri=str(alpaca)), field, None)


def test_too_many_bad_rows_fail_before_training(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [ULTRACHAT_ROW] * 8 + [{"messages": [ULTRACHAT_ROW["messages"][0]]}] * 2)
    read = read_source(_source(format="messages", uri=str(path)), "f", None)
    check_bad_fraction(read, "f", 0.25)
    with pytest.raises(UserError, match=r"^f: 2 of 10 rows are bad \(20.0% > sft.max_bad_fraction 10.0%\): "
                                        r"no_assistant_turn 2"):
        check_bad_fraction(read, "f", 0.1)


# ---------------------------------------------------------------- the world's chat data


def test_world_chat_never_states_a_pretraining_eval_item():
    """Reserved and held-out phrasings of the pretraining eval items never appear in chat answers
    (the chat evaluation's own hold-outs: tests/test_chat_eval.py)."""
    from tasks.data.corpus import build_corpus
    from tasks.sft.world_chat import world_chat

    chat = world_chat(1234, 24)
    corpus = build_corpus(1234, 24, 10)
    answers = [m["content"] for c in chat.sft for m in c if m["role"] == "assistant"]
    answers += [p.chosen[0]["content"] for p in chat.dpo] + [p.rejected[0]["content"] for p in chat.dpo]
    for task in ("tiny_facts", "tiny_paraphrase", "tiny_two_hop"):
        for item in corpus.eval_tasks[task].items:
            gold = f"{item['query']} {item['choices'][item['gold']]}."
            assert not any(gold in answer for answer in answers), (task, gold)


# ---------------------------------------------------------------- a variant's training set


def _params(tmp_path, **variant):
    from conftest import pretrain_params

    from tasks.params import parse_params

    raw = pretrain_params(tmp_path).model_dump(mode="json")
    raw["sft"] = {"variants": [{"name": "v", "base": "24.576K", "sources": [{"name": "world", "format": "builtin"}],
                                "max_length": 128, "batch_size": 4, "micro_batch": 2,
                                "dpo": {"sources": [{"name": "prefs", "format": "builtin"}], "batch_size": 4,
                                        "micro_batch": 2}, **variant}]}
    return parse_params(raw, "test params")


def test_world_training_sets_pack_conversations_and_pad_pairs(tmp_path, small_tokenizer_dir):
    from model.tokenizer import Tokenizer
    from tasks.sft.datasets import build
    from tasks.sft.world_chat import chat_for

    tokenizer = Tokenizer.load(small_tokenizer_dir)
    params = _params(tmp_path)
    variant = params.sft.variants[0]
    sft = build(params, variant, tokenizer, dpo=False)
    summary = sft.summary
    chat = chat_for(params)
    encoded = summary["conversations"] + summary["val_conversations"]
    assert encoded + sum(summary["encoding"].values()) == len(chat.sft)
    assert summary["encoding"]["dropped_overlong"] > 0  # the test tokenizer spends ~66-400 ids on a conversation
    assert summary["rows"] <= summary["conversations"] and 0.5 < summary["fill"] <= 1
    assert sft.arrays["train_inputs"].shape == (summary["rows"], 128)
    pairs = build(params, variant, tokenizer, dpo=True)
    dropped = pairs.summary["encoding"].get("dropped_pairs", 0)
    assert pairs.items + pairs.summary["val_pairs"] + dropped == len(chat.dpo)
    assert (pairs.arrays["train_chosen_inputs"].shape == pairs.arrays["train_rejected_inputs"].shape
            == (pairs.items, 128))

    short = _params(tmp_path, max_length=100, overlong="truncate")
    truncated = build(short, short.sft.variants[0], tokenizer, dpo=False)
    assert truncated.summary["encoding"]["truncated"] > 0 and truncated.arrays["train_inputs"].shape[1] == 100
    with pytest.raises(UserError, match=r"^sft.variants\[v\]: no training example is left after the length policy"):
        build(_params(tmp_path, max_length=8), _params(tmp_path, max_length=8).sft.variants[0], tokenizer, dpo=False)


def test_params_name_the_bad_variant_field(tmp_path):
    from tasks.errors import UserError as Error

    with pytest.raises(Error, match=r"sft.variants.0.template: .*unknown chat template 'vicuna'"):
        _params(tmp_path, template="vicuna")
    with pytest.raises(Error, match=r"sft.variants.0.base: not a token count: 'final'"):
        _params(tmp_path, base="final")
    with pytest.raises(Error, match=r"is not divisible by train.workers × micro_batch"):
        _params(tmp_path, batch_size=6)
