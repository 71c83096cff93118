"""The chat accuracy: does the model answer questions about people it never chatted about with the true fact?

Each item is a conversation ending with a user question, the value its reply must contain, and the
column it counts in (world_chat.py): `seen` (wordings SFT/DPO examples use), `held-out` (wordings
no example uses: the number a champion is chosen on) and `multi-turn` (a follow-up about the person
named the turn before). The model answers greedily from the chat template's generation prompt, up to
its end of turn (EOS or the template's stop string) or `max_new_tokens`, all questions decoded
together (model/decoder.py). A reply is correct when it names the answer (whole words, any case)
and none of the item's wrong values, so a model that lists every city it knows scores nothing.

Each column gets its accuracy, a Wilson 95% interval and its answers as a '1'/'0' string in item
order, so two models on the same questions compare pairwise (intervals.py). Scored alike for the
base milestone (prompted in the variant's template), the SFT and the SFT+DPO model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tasks.errors import UserError
from tasks.params import Params
from tasks.sft.intervals import wilson
from tasks.sft.world_chat import COLUMNS, ChatEvalItem, chat_for

SHOWN_EXAMPLES = 3   # replies per column kept in the metrics for a reader to see what the model says
SLOTS = 64           # questions decoded together
CHAMPION_COLUMN = "held-out"
FIELD = "sft.chat_eval.source"


def _jsonl_items(source: str) -> list[ChatEvalItem]:
    """The items of a JSON lines file: a local path, or a URI on storage every node reads (`s3://`: the
    cluster profile's, through tasks/remote_inputs.py, never a hub)."""
    from model.chat import MessagesError, check_messages
    from tasks.layout import is_uri
    from tasks.remote_inputs import read_input_file

    if not is_uri(source) and not Path(source).is_file():
        raise UserError(f"{FIELD}: {source} is not a file (a JSON lines file of "
                        "{\"messages\": [...], \"answer\": str}, or 'builtin')")
    try:
        text = read_input_file(source, FIELD).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{FIELD}: {source} is not UTF-8 text: {exc}") from None
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            check_messages(row["messages"], f"{source}:{number} messages")
            if row["messages"][-1]["role"] != "user" or not str(row["answer"]).strip():
                raise ValueError(f"{source}:{number}: the messages must end with a user turn and answer be non-empty")
            column = row.get("column", CHAMPION_COLUMN)
            if column not in COLUMNS:
                raise ValueError(f"{source}:{number}: column must be one of {', '.join(COLUMNS)}, got {column!r}")
        except (json.JSONDecodeError, KeyError, TypeError, MessagesError, ValueError) as exc:
            raise UserError(f"{FIELD}: {source}:{number}: {type(exc).__name__}: {exc}") from None
        items.append(ChatEvalItem(tuple(row["messages"]), str(row["answer"]), tuple(row.get("wrong", ())), column))
    if not items:
        raise UserError(f"{FIELD}: {source} has no items")
    return items


def eval_items(params: Params) -> list[ChatEvalItem]:
    spec = params.sft.chat_eval
    items = chat_for(params).eval if spec.source == "builtin" else _jsonl_items(spec.source)
    return items[:spec.limit] if spec.limit else items


def _names(reply: str, value: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", reply, flags=re.IGNORECASE) is not None


def is_correct(reply: str, item: ChatEvalItem) -> bool:
    return _names(reply, item.answer) and not any(_names(reply, wrong) for wrong in item.wrong)


def _prompt(tokenizer, template_source: str, messages) -> list[int]:
    from model.chat import render, tokenize

    return list(tokenize(tokenizer, render(template_source, messages, add_generation_prompt=True)).ids)


def answer(model, tokenizer, template_source: str, messages, max_new_tokens: int) -> str:
    """The model's greedy reply to one conversation, up to its end of turn (what `tinyllama chat` says)."""
    return answers(model, tokenizer, template_source, [messages], max_new_tokens)[0]


def answers(model, tokenizer, template_source: str, conversations, max_new_tokens: int) -> list[str]:
    """Greedy replies to many conversations, decoded `SLOTS` at a time; each ends at EOS, at the
    template's stop string or after `max_new_tokens` (what the context leaves)."""
    import torch

    from model.chat import stop_strings
    from model.decoder import BatchDecoder
    from model.textstream import TextStream

    prompts = [_prompt(tokenizer, template_source, messages) for messages in conversations]
    longest = min(max(map(len, prompts)) + max_new_tokens, model.config.max_seq_len)
    decoder = BatchDecoder(model, slots=min(SLOTS, len(prompts)), max_len=longest, prefill_chunk=2048)
    streams = [TextStream(tokenizer, prompt, stop_strings(template_source)) for prompt in prompts]
    waiting, owner = list(range(len(prompts)))[::-1], {}
    with torch.inference_mode():
        while waiting or owner:
            while waiting and decoder.has_free_slot():
                index = waiting.pop()
                owner[decoder.add(prompts[index], max_new_tokens, eos_id=tokenizer.eos_id)] = index
            for event in decoder.step():
                stream = streams[owner[event.seq_id]]
                stream.push(*event.tokens)
                if stream.done or event.finish is not None:
                    decoder.cancel(event.seq_id)
                    del owner[event.seq_id]
    for stream in streams:
        stream.finish()
    return [stream.text.strip() for stream in streams]


def chat_accuracy(model, tokenizer, template_source: str, items: list[ChatEvalItem], max_new_tokens: int) -> dict:
    """{"accuracy" (the held-out column's), "columns": {column: {"correct", "n", "accuracy", "ci95",
    "answers"}}, "examples": {column: [{"question", "answer", "reply", "correct"}, ...]}} over the
    columns the items have."""
    replies = answers(model, tokenizer, template_source, [item.messages for item in items], max_new_tokens)
    columns, examples = {}, {}
    for column in COLUMNS:
        pairs = [(item, reply) for item, reply in zip(items, replies) if item.column == column]
        if not pairs:
            continue
        marks = "".join("1" if is_correct(reply, item) else "0" for item, reply in pairs)
        correct = marks.count("1")
        columns[column] = {"correct": correct, "n": len(marks), "accuracy": correct / len(marks),
                           "ci95": list(wilson(correct, len(marks))), "answers": marks}
        examples[column] = [{"question": item.messages[-1]["content"], "answer": item.answer, "reply": reply,
                             "correct": mark == "1"} for (item, reply), mark in zip(pairs[:SHOWN_EXAMPLES], marks)]
    accuracy = columns.get(CHAMPION_COLUMN, next(iter(columns.values())))["accuracy"]
    return {"accuracy": accuracy, "columns": columns, "examples": examples}
