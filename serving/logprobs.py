"""The engine's log-probabilities (model/sampling.py `TokenLogprob`) in OpenAI's two response shapes.

- chat: `logprobs.content[]`, one `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}` per
  generated token, `top_logprobs` the N most likely (OpenAI's `top_logprobs`);
- completions (the legacy shape, as vLLM serves it): `{tokens, token_logprobs, top_logprobs, text_offset}`,
  each `top_logprobs` entry a dict {token text: logprob} of the N most likely plus the token itself; with
  `echo`, the prompt's tokens come first, the very first with `null` (nothing predicts it).

The values are the model's raw log-softmax, before penalties and temperature (vLLM's default). A token's
text is what it stands for (`bytes` exact: a byte-fallback piece is one byte of a UTF-8 sequence, so its
text alone may be a replacement character). The tokens are every token the model generated for the
choice, EOS and the pieces of a stop string included, as vLLM reports them.
"""

from __future__ import annotations

from collections.abc import Sequence

from model.sampling import TokenLogprob
from model.tokenizer import Tokenizer

FLOOR = -9999.0  # JSON has no -inf: vLLM's floor for a logprob


class LogprobFormat:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._tokens: dict[int, tuple[str, list[int]]] = {}

    def token(self, token: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token, cached: the same few thousand ids recur in every reply."""
        if token not in self._tokens:
            raw = self.tokenizer.token_bytes(token)
            self._tokens[token] = raw.decode("utf-8", errors="replace"), list(raw)
        return self._tokens[token]

    def _entry(self, token: int, logprob: float) -> dict:
        text, raw = self.token(token)
        return {"token": text, "logprob": max(logprob, FLOOR), "bytes": raw}

    def chat(self, entries: Sequence[TokenLogprob]) -> list[dict]:
        """OpenAI's `choices[].logprobs.content` items (a stream's `delta` chunk carries its tokens' items)."""
        return [{**self._entry(e.token, e.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in e.top]}
                for e in entries]

    def completion(self, tokens: Sequence[int], entries: Sequence[TokenLogprob | None], offset: int) -> dict:
        """The legacy `choices[].logprobs` of consecutive `tokens` (`entries[i]` is token i's, None for a
        prompt's first); `offset`: where the first token's text starts in the choice's text."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in zip(tokens, entries):
            text = self.token(token)[0]
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self.token(t)[0]: max(lp, FLOOR) for t, lp in entry.top}
            top.setdefault(text, max(entry.logprob, FLOOR))
            out["token_logprobs"].append(max(entry.logprob, FLOOR))
            out["top_logprobs"].append(top)
        return out

