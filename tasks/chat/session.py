"""A conversation with a chat model: the history, rendered through the model's own chat template
every turn, and each reply streamed as text while it is generated.

The prompt is the whole history rendered with the generation prompt, tokenized exactly as in
training (model/chat.py), so the model sees every turn the way it learned them. When the history no
longer fits the context (with room for a reply), the oldest exchanges are dropped, the system
message kept.
"""

from __future__ import annotations

from collections.abc import Iterator

from model.chat import check_messages, render, stop_strings, tokenize
from model.generate import generate_stream, warm_up
from model.textstream import TextStream


class ChatSession:
    def __init__(self, model, tokenizer, template_source: str, system: str | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, compile: bool = False):
        self.model, self.tokenizer, self.source = model, tokenizer, template_source
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        self.max_new_tokens = max_new_tokens
        self.compile = compile
        if compile:
            warm_up(model)  # compiled now, so the first reply does not wait for it

    @property
    def history(self) -> list[dict]:
        return self.system + self.turns

    def reset(self) -> None:
        self.turns = []

    def _prompt(self, messages: list[dict]) -> list[int]:
        return list(tokenize(self.tokenizer, render(self.source, messages, add_generation_prompt=True)).ids)

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to the user's `text`; once it is complete the exchange joins the history
        (an empty reply leaves the history as it was)."""
        question = {"role": "user", "content": text}
        check_messages(self.history + [question], "message")
        room = min(self.max_new_tokens, self.model.config.max_seq_len // 2)
        turns = self.turns
        prompt = self._prompt(self.system + turns + [question])
        while len(prompt) + room > self.model.config.max_seq_len and turns:
            turns = turns[2:]  # forget the oldest exchange
            prompt = self._prompt(self.system + turns + [question])
        if len(prompt) >= self.model.config.max_seq_len:
            raise ValueError(f"message: {len(prompt)} tokens leave no room for a reply in the model's "
                             f"context of {self.model.config.max_seq_len}")
        stream = TextStream(self.tokenizer, prompt, stop_strings(self.source))
        for token in generate_stream(self.model, prompt, self.max_new_tokens, eos_id=self.tokenizer.eos_id,
                                     compile=self.compile, **self.sampling):
            if piece := stream.push(token):
                yield piece
            if stream.done:
                break
        if tail := stream.finish():
            yield tail
        answer = stream.text.strip()
        if answer:
            self.turns = turns + [question, {"role": "assistant", "content": answer}]
