"""Chat templates as training and transformers see them: the exported dir's `chat_template` makes
`apply_chat_template` render byte-identical prompts, training's token ids are transformers' ids,
and the loss mask covers exactly the assistant's tokens, checked token by token per template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from model.chat import TEMPLATES, MessagesError, check_messages, render, template, tokenize
from model.config import micro
from model.hf import read_chat_template, save_hf
from model.llama import Llama
from model.textstream import TextStream
from model.tokenizer import Tokenizer, save_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_MODEL = ROOT.parent / "shared" / "assets" / "tokenizer" / "llama2c_tokenizer.model"

SYSTEM = {"role": "system", "content": "You answer in one sentence."}
TURNS = [{"role": "user", "content": "Where does Alice Moreno live?"},
         {"role": "assistant", "content": "Alice Moreno lives in Lyon."},
         {"role": "user", "content": "And what is her job?"},
         {"role": "assistant", "content": "She works as a baker, 2 days a week!"}]
CONVERSATIONS = {"no system": TURNS, "system": [SYSTEM, *TURNS]}
# What each template writes after the assistant's text, inside its generation span.
TURN_END = {"zephyr": "</s>", "chatml": "<|im_end|>", "llama2": " </s>"}


@pytest.fixture(scope="module", params=["small", "llama2"])
def chat_dirs(request, small_tokenizer_dir, tmp_path_factory):
    """{template: chat model dir} for one tokenizer: the trained test tokenizer, and Llama 2's own."""
    if request.param == "llama2":
        if not LLAMA2_MODEL.is_file():
            pytest.skip("../shared/assets absent")
        tokenizer_dir = save_tokenizer_dir(LLAMA2_MODEL.read_bytes(), tmp_path_factory.mktemp("llama2") / "tok")
    else:
        tokenizer_dir = small_tokenizer_dir
    vocab = Tokenizer.load(tokenizer_dir).vocab_size
    torch.manual_seed(0)
    model = Llama(micro().with_overrides(vocab_size=vocab, n_layer=1, dim=32, n_head=2, n_kv_head=1, mlp_dim=32))
    root = tmp_path_factory.mktemp(f"chat-{request.param}")
    return {name: save_hf(model, root / name, tokenizer_dir, chat_template=TEMPLATES[name].source,
                          stop_strings=TEMPLATES[name].stop) for name in TEMPLATES}


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_transformers_renders_byte_identical_prompts(chat_dirs, name, case):
    hf = AutoTokenizer.from_pretrained(str(chat_dirs[name]))
    messages = CONVERSATIONS[case]
    assert read_chat_template(chat_dirs[name]) == TEMPLATES[name].source
    assert hf.apply_chat_template(messages, tokenize=False) == render(TEMPLATES[name].source, messages).text
    prompt = messages[:-1]
    ours = render(TEMPLATES[name].source, prompt, add_generation_prompt=True).text
    assert hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == ours
    if name != "llama2":  # the Llama 2 format has no assistant header
        assert ours.endswith({"zephyr": "<|assistant|>\n", "chatml": "<|im_start|>assistant\n"}[name])


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_ids_and_assistant_mask_match_transformers_token_by_token(chat_dirs, name, case):
    directory, messages = chat_dirs[name], CONVERSATIONS[case]
    hf = AutoTokenizer.from_pretrained(str(directory))
    rendered = render(TEMPLATES[name].source, messages)
    tokens = tokenize(Tokenizer.load(directory), rendered)

    starts_with_bos = rendered.text.startswith("<s>")
    assert list(tokens.ids) == hf(rendered.text, add_special_tokens=not starts_with_bos).input_ids
    reference = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    offset = 0 if starts_with_bos else 1  # apply_chat_template adds no BOS; training puts one first
    assert list(tokens.ids[offset:]) == reference["input_ids"]
    assert [int(a) for a in tokens.assistant[offset:]] == reference["assistant_masks"]
    assert not any(tokens.assistant[:offset])

    # The learned tokens decode to exactly the assistant turns, each with its end-of-turn marker.
    pieces, run = [], []
    for token, learned in zip(tokens.ids, tokens.assistant):
        if learned:
            run.append(token)
        elif run:
            pieces.append(run)
            run = []
    pieces += [run] if run else []
    texts = [hf.decode(p, skip_special_tokens=False).strip() for p in pieces]
    expected = [(m["content"] + TURN_END[name]).strip() for m in messages if m["role"] == "assistant"]
    assert texts == expected


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_the_generation_prompt_is_a_prefix_of_the_trained_sequence(chat_dirs, name):
    """What serving feeds the model is exactly the start of what training showed it."""
    tokenizer = Tokenizer.load(chat_dirs[name])
    source = TEMPLATES[name].source
    full = tokenize(tokenizer, render(source, TURNS)).ids
    prompt = tokenize(tokenizer, render(source, TURNS[:-1], add_generation_prompt=True)).ids
    assert full[:len(prompt)] == prompt and len(full) > len(prompt)


def test_chat_model_dir_records_stop_strings(chat_dirs):
    import json

    for name, directory in chat_dirs.items():
        generation = json.loads((directory / "generation_config.json").read_text())
        assert generation.get("stop_strings", []) == list(TEMPLATES[name].stop)


@pytest.mark.parametrize("messages, reason", [
    ([], "not_a_list"),
    ([{"role": "user", "content": "hi"}], "no_assistant_turn"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}], "roles_out_of_order"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}], "empty_content"),
    ([{"role": "bot", "content": "x"}], "bad_role"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, SYSTEM], "roles_out_of_order"),
])
def test_bad_conversations_say_why(messages, reason):
    with pytest.raises(MessagesError) as caught:
        check_messages(messages, "messages", final_assistant=True)
    assert caught.value.reason == reason and str(caught.value).startswith("messages")


def test_unknown_template_names_the_field():
    with pytest.raises(ValueError, match=r"chat_template: unknown template 'vicuna'"):
        template("vicuna")


# ---------------------------------------------------------------- streamed text with stop strings


class _Pieces:
    """A stand-in tokenizer whose ids are whole strings (TextStream only decodes)."""

    byte_ids = frozenset({99})

    def __init__(self, vocab):
        self.vocab = vocab

    def decode(self, ids):
        raw = b"".join(self.vocab[i].encode() if isinstance(self.vocab[i], str) else self.vocab[i] for i in ids)
        return raw.decode("utf-8", errors="replace")


def test_text_stream_holds_back_a_forming_stop_string_and_never_shows_it():
    vocab = {1: "Q:", 2: " Lyon", 3: ".", 4: "<|im", 5: "_end|>", 6: "<|i", 7: "mx", 8: " more"}
    stream = TextStream(_Pieces(vocab), [1], stop=["<|im_end|>"])
    assert [stream.push(t) for t in (2, 3, 6, 7)] == [" Lyon", ".", "", "<|imx"]  # a false start is released
    assert stream.push(4) == "" and stream.push(5) == "" and stream.done
    assert stream.push(8) == "" and stream.text == " Lyon.<|imx"


def test_text_stream_waits_for_a_whole_utf8_character():
    vocab = {1: "x", 2: " caf", 99: b"\xc3", 100: b"\xa9"}
    tokenizer = _Pieces(vocab)
    tokenizer.byte_ids = frozenset({99, 100})
    stream = TextStream(tokenizer, [1])
    assert [stream.push(t) for t in (2, 99, 100)] == [" caf", "", ""]
    assert stream.finish() == "é" and stream.text == " café"
