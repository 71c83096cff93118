"""Token ids → text as it becomes final, for streaming.

SentencePiece pieces only become text in context (the space before a word, a multi-byte character
spread over byte pieces), so the prompt and completion are decoded together and only the new
suffix is released; nothing is released while the last token is a byte piece, so a character
split across byte pieces comes out whole.
"""

from __future__ import annotations

from collections.abc import Iterable

BYTE_PIECES = range(3, 3 + 256)  # Llama-2-style vocab: <0x00>..<0xFF> right after unk, bos, eos


class TextStream:
    def __init__(self, tokenizer, prompt_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.prefix = len(tokenizer.decode(self.ids))
        self.shown = 0

    def push(self, tokens: Iterable[int]) -> str:
        """The text the new tokens complete ('' while a character is still incomplete)."""
        self.ids.extend(tokens)
        if self.ids and self.ids[-1] in BYTE_PIECES:
            return ""
        return self.flush()

    def flush(self) -> str:
        """Everything not yet released, complete or not (the stream has ended)."""
        text = self.tokenizer.decode(self.ids)[self.prefix:]
        out, self.shown = text[self.shown:], len(text)
        return out
