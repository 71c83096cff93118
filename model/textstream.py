"""Generated token ids → text, streamed: what a terminal, an HTTP stream or an answer checker shows.

Why a class and not `decode(ids)` at the end: SentencePiece pieces only become text in context (a
word's leading space, a multi-byte character split over byte pieces), and a chat turn ends at a
stop string that is text, not a token (ChatML's `<|im_end|>` is several pieces). So each push decodes
only the tokens since the last emission, in the context of the ones before them (the text of
`ids[prefix:]` minus that of `ids[prefix:read]`: the difference is exactly the new text, leading
space included, and costs O(new tokens), not O(completion)); it emits what is new and final, holds
back a tail that could still become a stop string, and ends at the first stop string, which is never
emitted. A stop string can only begin in the held-back tail or the new text (an earlier start would
have been held back), so only those are searched. Nothing is decoded while the last token is a byte
piece: a run of byte pieces is one UTF-8 sequence, and decoding it early would show (and then take
back) replacement characters; so `prefix` and `read` always sit on character boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from model.tokenizer import Tokenizer

_CONTEXT = 4           # prompt tokens decoded before the completion, for the completion's leading space


class TextStream:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []      # the completion
        self.done = False
        self.text = ""                # everything emitted so far
        self._tokens = list(prompt_ids[-_CONTEXT:])  # a little prompt context, then the completion
        self._prefix = 0              # _tokens[_prefix:_read] were decoded last time: the new text's context
        self._read = len(self._tokens)
        self._pending = ""            # decoded, not yet emitted (a tail that may start a stop string)

    def push(self, *tokens: int) -> str:
        """Text that became final with `tokens` ('' while held back, and once `done`). A server
        pushes a decoding step's tokens at once: one decode per step, not per token."""
        if self.done or not tokens:
            return ""
        new = [int(t) for t in tokens]
        self.ids.extend(new)
        self._tokens.extend(new)
        return "" if new[-1] in self.tokenizer.byte_ids else self._emit(final=False)

    def finish(self) -> str:
        """The held-back tail, once generation has ended (at EOS or the token limit)."""
        return "" if self.done else self._emit(final=True)

    def _decode_new(self) -> str:
        if self._read == len(self._tokens):
            return ""
        before = self.tokenizer.decode(self._tokens[self._prefix:self._read])
        after = self.tokenizer.decode(self._tokens[self._prefix:])
        self._prefix, self._read = self._read, len(self._tokens)
        return after[len(before):]

    def _emit(self, final: bool) -> str:
        text = self._pending + self._decode_new()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        hold = 0
        if cut >= 0:
            self.done, text = True, text[:cut]
        elif not final:
            hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        new, self._pending = text[:len(text) - hold], text[len(text) - hold:]
        self.text += new
        return new
