"""Conversations and preference pairs → token ids with the positions training learns from.

A conversation is rendered with the variant's chat template (model/chat.py), tokenized exactly as
transformers tokenizes that text, and every token the assistant wrote (its `{% generation %}`
spans: content and end-of-turn marker) is a training target; system and user text and the
template's headers are context only. A preference pair becomes two such sequences, prompt +
chosen and prompt + rejected, whose targets are the completion's tokens only (what DPO scores).

Longer than `max_length` ids: `truncate` cuts the end off (an example left with nothing to learn
is dropped), `drop` drops it. Both are counted, never silent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from model.chat import Rendered, render, tokenize
from model.tokenizer import Tokenizer
from tasks.sft.formats import Preference


@dataclass(frozen=True)
class Sequence:
    ids: np.ndarray      # int64 token ids, BOS first
    learn: np.ndarray    # bool per id: a training target (predicted from the ids before it)


@dataclass
class Encoded:
    sequences: list = field(default_factory=list)   # Sequence, or (chosen, rejected) pairs of them
    counts: Counter = field(default_factory=Counter)  # truncated / dropped_overlong / dropped_no_target


class Encoder:
    """Renders and tokenizes for one template and one length policy."""

    def __init__(self, tokenizer: Tokenizer, template_source: str, max_length: int, overlong: str):
        self.tokenizer, self.source = tokenizer, template_source
        self.max_length, self.overlong = max_length, overlong

    def _sequence(self, rendered: Rendered, counts: Counter) -> Sequence | None:
        tokens = tokenize(self.tokenizer, rendered)
        ids, learn = np.asarray(tokens.ids, dtype=np.int64), np.asarray(tokens.assistant, dtype=bool)
        if len(ids) > self.max_length:
            if self.overlong == "drop":
                counts["dropped_overlong"] += 1
                return None
            ids, learn = ids[:self.max_length], learn[:self.max_length]
            counts["truncated"] += 1
        if not learn[1:].any():  # the first id (BOS) is never a target
            counts["dropped_no_target"] += 1
            return None
        return Sequence(ids, learn)

    def conversations(self, conversations) -> Encoded:
        out = Encoded()
        for messages in conversations:
            sequence = self._sequence(render(self.source, messages), out.counts)
            if sequence is not None:
                out.sequences.append(sequence)
        return out

    def _completion(self, prompt: tuple, completion: tuple, counts: Counter) -> Sequence | None:
        """prompt + completion, learning only the completion's assistant tokens."""
        prefix = len(render(self.source, prompt, add_generation_prompt=True).text)
        full = render(self.source, prompt + completion)
        spans = tuple(span for span in full.assistant_spans if span[0] >= prefix)
        return self._sequence(Rendered(full.text, spans), counts)

    def preferences(self, pairs: list[Preference]) -> Encoded:
        out = Encoded()
        for pair in pairs:
            counts = Counter()
            chosen = self._completion(pair.prompt, pair.chosen, counts)
            rejected = self._completion(pair.prompt, pair.rejected, counts)
            if chosen is None or rejected is None:
                out.counts["dropped_pairs"] += 1
            else:
                out.sequences.append((chosen, rejected))
            out.counts.update(counts)
        return out
