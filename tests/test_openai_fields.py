"""The OpenAI request fields and logprob shapes in-process (serving/protocol.py, serving/logprobs.py), fast:
what tests/test_serving_surface.py checks over HTTP against a served model, here without a server."""

import pytest
from pydantic import ValidationError

from model.sampling import TokenLogprob
from serving.logprobs import LogprobFormat
from serving.protocol import ChatCompletionRequest, CompletionRequest, validation_error


def parse(cls, **fields):
    base = {"model": "m", **({"prompt": "x"} if cls is CompletionRequest else {"messages": [{"role": "user",
                                                                                          "content": "x"}]})}
    try:
        return cls(**{**base, **fields})
    except ValidationError as exc:
        return validation_error(exc.errors())


@pytest.mark.parametrize("prompt, batch", [("hi", ["hi"]), ([1, 2], [[1, 2]]), (["a", "b"], ["a", "b"]),
                                           ([[1], [2, 3]], [[1], [2, 3]])])
def test_the_four_prompt_forms_become_a_batch(prompt, batch):
    assert parse(CompletionRequest, prompt=prompt).prompt == batch


@pytest.mark.parametrize("cls, fields, param", [
    (CompletionRequest, {"prompt": [True]}, "prompt"), (CompletionRequest, {"prompt": [["a"]]}, "prompt"),
    (CompletionRequest, {"top_k": -5}, "top_k"), (ChatCompletionRequest, {"min_p": 2}, "min_p"),
    (ChatCompletionRequest, {"presence_penalty": float("nan")}, "presence_penalty"),
    (CompletionRequest, {"repetition_penalty": float("inf")}, "repetition_penalty"),
    (ChatCompletionRequest, {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
])
def test_bad_fields_name_themselves(cls, fields, param):
    error = parse(cls, **fields)
    assert error.status == 400 and error.param == param, error.message


def test_how_many_top_logprobs_each_endpoint_asks():
    assert parse(CompletionRequest).top_logprobs_asked() is None
    assert parse(CompletionRequest, logprobs=0).top_logprobs_asked() == 0
    assert parse(ChatCompletionRequest, logprobs=True).top_logprobs_asked() == 0
    assert parse(ChatCompletionRequest, logprobs=True, top_logprobs=4).top_logprobs_asked() == 4
    assert parse(ChatCompletionRequest, logprobs=None).top_logprobs_asked() is None


def test_logprob_shapes(small_tokenizer_dir):
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(small_tokenizer_dir)
    fmt = LogprobFormat(tokenizer)
    ids = tokenizer.encode("the river ✓", bos=True)
    text = [tokenizer.token_bytes(t).decode("utf-8", errors="replace") for t in ids]
    entries = [None] + [TokenLogprob(t, -1.0 - i, ((ids[0], -0.5),)) for i, t in enumerate(ids[1:])]
    legacy = fmt.completion(ids, entries, 7)
    assert legacy["tokens"] == text and legacy["token_logprobs"][0] is None and legacy["top_logprobs"][0] is None
    assert legacy["token_logprobs"][1:] == [-1.0 - i for i in range(len(ids) - 1)]
    assert legacy["top_logprobs"][1] == {"<s>": -0.5, text[1]: -1.0}  # the top N, then the token itself
    assert legacy["text_offset"][0] == 7 and legacy["text_offset"][2] == 7 + len(text[0]) + len(text[1])
    raw = list(tokenizer.token_bytes(ids[1]))
    chat = fmt.chat([TokenLogprob(ids[1], float("-inf"), ((ids[1], -0.1),))])
    assert chat == [{"token": text[1], "logprob": -9999.0, "bytes": raw,  # JSON has no -inf: vLLM's floor
                     "top_logprobs": [{"token": text[1], "logprob": -0.1, "bytes": raw}]}]
    assert b"".join(bytes(fmt.token(t)[1]) for t in ids[1:]).decode() == " the river ✓"
