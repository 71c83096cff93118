"""Stop sequences of token ids in a stream: end at the first one, never emit a piece of it.

`generate(stop=[[...]])` gets tokens in chunks, and the tail that could still grow into a stop sequence
is held back until it either completes one (generation ends there, the stop itself is dropped) or
diverges (it is released). So a streamed stop sequence is never emitted and then retracted. (Stop
*strings*, which span token boundaries, are model/textstream.py's job.)
"""

from __future__ import annotations

from collections.abc import Sequence


class StopFilter:
    """Chunks of ids in, final chunks out; `done` once a stop sequence completed."""

    def __init__(self, stop: Sequence[Sequence[int]] | None):
        self.stop = [list(s) for s in (stop or []) if len(s)]
        self.pending: list[int] = []
        self.done = False

    def push(self, chunk: Sequence[int]) -> list[int]:
        self.pending = self.pending + list(chunk)
        ends = [i for i in (_find(self.pending, s) for s in self.stop) if i >= 0]
        if ends:
            self.done = True
            out, self.pending = self.pending[:min(ends)], []
            return out
        keep = max((n for s in self.stop for n in range(1, len(s)) if self.pending[-n:] == s[:n]), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> list[int]:
        out, self.pending = self.pending, []
        return out


def _find(haystack: list[int], needle: list[int]) -> int:
    """Index of the first occurrence of `needle` in `haystack`, or -1."""
    n = len(needle)
    return next((i for i in range(len(haystack) - n + 1) if haystack[i:i + n] == needle), -1)
