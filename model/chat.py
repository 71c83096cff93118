"""Chat templates: the text a conversation becomes, for training, serving and transformers alike.

A template is a Jinja string stored as the exported tokenizer's `chat_template`, so
`transformers.AutoTokenizer.apply_chat_template` renders byte-identical prompts to the ones the
model was trained on. `render` uses the same Jinja environment transformers does (sandboxed,
`trim_blocks`, `lstrip_blocks`) and the same `{% generation %}` blocks, which mark the assistant's
own tokens: training puts its loss only there (transformers' `return_assistant_tokens_mask`
reads the same marks), and serving stops where a turn ends.

The three templates TinyLlama's chat releases used:
- `zephyr` (v1.0, the default): `<|user|>\\n…</s>\\n<|assistant|>\\n…</s>\\n`;
- `chatml` (v0.2–v0.4): `<|im_start|>user\\n…<|im_end|>\\n`; `<|im_end|>` is text here (no added
  tokens, so the vocabulary stays the base model's), and a turn ends at that string;
- `llama2`: `<s>[INST] <<SYS>>\\n…\\n<</SYS>>\\n\\n… [/INST] … </s>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str                  # the Jinja text
    stop: tuple[str, ...] = ()   # strings that end an assistant turn besides EOS


_ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}"
    "{% set system = none %}{% set turns = messages %}"
    "{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is not none %}"
    "{{ bos_token + '[INST] <<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}"
    "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% endif %}"
    "{% else %}"
    "{% generation %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)

TEMPLATES = {
    "zephyr": ChatTemplate("zephyr", _ZEPHYR),
    "chatml": ChatTemplate("chatml", _CHATML, stop=("<|im_end|>",)),
    "llama2": ChatTemplate("llama2", _LLAMA2),
}
DEFAULT_TEMPLATE = "zephyr"

# (rendered blocks so far, spans found) of the render in progress in this thread or task.
_TRACKING: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("chat_spans", default=None)


def template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"chat_template: unknown template {name!r} (known: {', '.join(TEMPLATES)})")
    return TEMPLATES[name]


def stop_strings(source: str) -> tuple[str, ...]:
    """The turn-ending strings of a template given as Jinja text (e.g. read from tokenizer_config.json)."""
    for known in TEMPLATES.values():
        if known.source == source:
            return known.stop
    return ("<|im_end|>",) if "<|im_end|>" in source else ()


class MessagesError(ValueError):
    """A conversation no template can render; `reason` is the kind of problem, for skip counts."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def check_messages(messages: Sequence[dict], field: str = "messages", *, final_assistant: bool = False) -> None:
    """A conversation every template renders: an optional system message first, then user and
    assistant turns alternating from a user turn, each with non-empty text. `final_assistant`
    also requires an assistant turn last (a training example). Errors (`MessagesError`, a
    `ValueError`) name the message and field; their `reason` is one of `not_a_list`, `bad_message`,
    `bad_role`, `empty_content`, `roles_out_of_order`, `no_assistant_turn`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MessagesError(f"{field}: must be a non-empty list of messages", "not_a_list")
    expected = "user"
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise MessagesError(f"{where}: must be an object with 'role' and 'content'", "bad_message")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise MessagesError(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}", "bad_role")
        if not isinstance(content, str) or not content.strip():
            raise MessagesError(f"{where}.content: must be a non-empty string", "empty_content")
        if role == "system":
            if i != 0:
                raise MessagesError(f"{where}.role: a system message may only come first", "roles_out_of_order")
            continue
        if role != expected:
            raise MessagesError(f"{where}.role: expected {expected!r} (turns alternate user/assistant), "
                                f"got {role!r}", "roles_out_of_order")
        expected = "assistant" if role == "user" else "user"
    if final_assistant and messages[-1].get("role") != "assistant":
        raise MessagesError(f"{field}: the last message must be the assistant's (nothing to learn otherwise)",
                            "no_assistant_turn")


@dataclass(frozen=True)
class Rendered:
    text: str
    assistant_spans: tuple[tuple[int, int], ...]  # [start, end) character ranges the assistant wrote


@lru_cache(maxsize=16)
def _compiled(source: str):
    """The template compiled in transformers' environment: sandboxed, trim_blocks + lstrip_blocks, a
    `generation` block that records where the assistant's text lands in the output."""
    import json

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationSpans(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationSpans, loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render(source: str, messages: Sequence[dict], *, add_generation_prompt: bool = False,
           bos_token: str = "<s>", eos_token: str = "</s>") -> Rendered:
    """The conversation as text, and where the assistant's parts of it are."""
    compiled = _compiled(source)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _TRACKING.set((blocks, spans))
    try:
        for block in compiled.generate(messages=[dict(m) for m in messages], bos_token=bos_token,
                                       eos_token=eos_token, add_generation_prompt=add_generation_prompt):
            blocks.append(block)
    finally:
        _TRACKING.reset(token)
    return Rendered("".join(blocks), tuple(spans))


@dataclass(frozen=True)
class ChatTokens:
    ids: tuple[int, ...]
    assistant: tuple[bool, ...]  # per token: written by the assistant (where training puts its loss)


def tokenize(tokenizer: Tokenizer, rendered: Rendered) -> ChatTokens:
    """Token ids of a rendered conversation (`Tokenizer.encode_chat`: as transformers encodes it)
    and which of them the assistant wrote: every token overlapping an assistant span, the rule of
    transformers' `return_assistant_tokens_mask`, so a piece straddling a span edge is learned."""
    ids, offsets = tokenizer.encode_chat(rendered.text)
    spans, span = rendered.assistant_spans, 0
    assistant = []
    for start, end in offsets:
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        assistant.append(span < len(spans) and end > spans[span][0])
    return ChatTokens(tuple(ids), tuple(assistant))
