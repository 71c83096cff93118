"""Stop sequences in a stream: end at the first one, never emit a piece of it.

The same filter serves token ids (`generate(stop=[[...]])`) and text (a server's `stop` strings, which
can span token boundaries): a stream arrives in chunks, and the tail that could still grow into a
stop sequence is held back until it either completes one (generation ends there, the stop itself is
dropped) or diverges (it is released). So a streamed stop sequence is never emitted and then retracted.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopFilter:
    """Chunks in (lists of ids, or strings when `text`), final chunks out; `done` once a stop sequence completed."""

    def __init__(self, stop: Sequence[Sequence] | None, text: bool = False):
        self.empty = "" if text else []
        self.stop = [s if text else list(s) for s in (stop or []) if len(s)]
        self.pending = self.empty
        self.done = False

    def push(self, chunk: Sequence) -> Sequence:
        self.pending = self.pending + chunk
        ends = [i for i in (_find(self.pending, s) for s in self.stop) if i >= 0]
        if ends:
            self.done = True
            out, self.pending = self.pending[:min(ends)], self.empty
            return out
        keep = max((n for s in self.stop for n in range(1, len(s)) if self.pending[-n:] == s[:n]), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> Sequence:
        out, self.pending = self.pending, self.empty
        return out


def _find(haystack: Sequence, needle: Sequence) -> int:
    """Index of the first occurrence of `needle` in `haystack` (a list or a str), or -1."""
    if isinstance(haystack, str):
        return haystack.find(needle)
    n = len(needle)
    return next((i for i in range(len(haystack) - n + 1) if haystack[i:i + n] == needle), -1)
