"""Generated token ids → text, streamed: what a terminal, an HTTP stream or an answer checker shows.

Why a class and not `decode(ids)` at the end: SentencePiece pieces only become text in context (a
word's leading space, a multi-byte character split over byte pieces), and a chat turn ends at a
stop string that is text, not a token (ChatML's `<|im_end|>` is several pieces). So every push
decodes the completion after a little prompt context, emits what is new and final, holds back a
tail that could still become a stop string, and ends at the first stop string, which is never
emitted. Nothing is decoded while the last token is a byte piece: a run of byte pieces is one
UTF-8 sequence, and decoding it early would show (and then take back) replacement characters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from model.tokenizer import Tokenizer

_CONTEXT = 4           # prompt tokens decoded before the completion, for the completion's leading space


class TextStream:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.context = list(prompt_ids[-_CONTEXT:])
        self.skip = len(tokenizer.decode(self.context))
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0
        self.done = False
        self.text = ""  # everything emitted so far

    def push(self, *tokens: int) -> str:
        """Text that became final with `tokens` ('' while held back, and once `done`). A server
        pushes a decoding step's tokens at once: one decode per step, not per token."""
        if self.done or not tokens:
            return ""
        self.ids.extend(int(t) for t in tokens)
        return "" if tokens[-1] in self.tokenizer.byte_ids else self._emit(final=False)

    def finish(self) -> str:
        """The held-back tail, once generation has ended (at EOS or the token limit)."""
        return "" if self.done else self._emit(final=True)

    def _emit(self, final: bool) -> str:
        text = self.tokenizer.decode(self.context + self.ids)[self.skip:]
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.done, text = True, text[:cut]
        elif not final:
            hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[:len(text) - hold]
        new = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        self.text += new
        return new
