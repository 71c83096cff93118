"""The held-out chat accuracy: does the model answer a question in-template with the true fact?

Each item is a conversation ending with a user question and the answer its reply must contain.
The model answers greedily (`model.generate`) from the chat template's generation prompt, up to
its end of turn (EOS or the template's stop string) or `max_new_tokens`. A reply is correct when
it names the answer (whole words, any case) and none of the item's wrong values, so a model that
lists every city it knows scores nothing. Scored alike for the base milestone (prompted in the
variant's template), the SFT and the SFT+DPO model, so the three numbers compare.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tasks.errors import UserError
from tasks.params import Params
from tasks.sft.world_chat import ChatEvalItem, chat_for

SHOWN_EXAMPLES = 5  # replies kept in the metrics for a reader to see what the model says


def _jsonl_items(path: Path) -> list[ChatEvalItem]:
    from model.chat import MessagesError, check_messages

    if not path.is_file():
        raise UserError(f"sft.chat_eval.source: {path} is not a file (a JSON lines file of "
                        "{\"messages\": [...], \"answer\": str}, or 'builtin')")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            check_messages(row["messages"], f"{path}:{number} messages")
            if row["messages"][-1]["role"] != "user" or not str(row["answer"]).strip():
                raise ValueError(f"{path}:{number}: the messages must end with a user turn and answer be non-empty")
        except (json.JSONDecodeError, KeyError, TypeError, MessagesError, ValueError) as exc:
            raise UserError(f"sft.chat_eval.source: {path}:{number}: {type(exc).__name__}: {exc}") from None
        items.append(ChatEvalItem(tuple(row["messages"]), str(row["answer"]), tuple(row.get("wrong", ()))))
    if not items:
        raise UserError(f"sft.chat_eval.source: {path} has no items")
    return items


def eval_items(params: Params) -> list[ChatEvalItem]:
    spec = params.sft.chat_eval
    items = chat_for(params).eval if spec.source == "builtin" else _jsonl_items(Path(spec.source))
    return items[:spec.limit] if spec.limit else items


def _names(reply: str, value: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", reply, flags=re.IGNORECASE) is not None


def is_correct(reply: str, item: ChatEvalItem) -> bool:
    return _names(reply, item.answer) and not any(_names(reply, wrong) for wrong in item.wrong)


def answer(model, tokenizer, template_source: str, messages, max_new_tokens: int) -> str:
    """The model's greedy reply to a conversation, up to its end of turn."""
    from model.chat import render, stop_strings, tokenize
    from model.generate import generate_stream
    from model.textstream import TextStream

    prompt = list(tokenize(tokenizer, render(template_source, messages, add_generation_prompt=True)).ids)
    text = TextStream(tokenizer, prompt, stop_strings(template_source))
    budget = min(max_new_tokens, model.config.max_seq_len - len(prompt))
    for token in generate_stream(model, prompt, budget, temperature=0.0, eos_id=tokenizer.eos_id):
        text.push(token)
        if text.done:
            break
    text.finish()
    return text.text.strip()


def chat_accuracy(model, tokenizer, template_source: str, items: list[ChatEvalItem], max_new_tokens: int) -> dict:
    """{"accuracy", "n", "examples": [{"question", "answer", "reply", "correct"}, ...]}."""
    import torch

    correct, examples = 0, []
    with torch.inference_mode():
        for item in items:
            reply = answer(model, tokenizer, template_source, item.messages, max_new_tokens)
            ok = is_correct(reply, item)
            correct += ok
            if len(examples) < SHOWN_EXAMPLES:
                examples.append({"question": item.messages[-1]["content"], "answer": item.answer,
                                 "reply": reply, "correct": ok})
    return {"accuracy": correct / len(items), "n": len(items), "examples": examples}
