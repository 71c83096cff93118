"""The deploy stage's smoke check and measurements, through the official `openai` client.

What a user would do first against a fresh deployment: list the model, a completion, the same
completion streamed (it must be identical at temperature 0), a chat turn (when the model has a chat
template), and one bad request (it must be a 400 and the server must answer the next good one).
Then the numbers for metrics/serve.json: time to first token, and aggregate completion tokens/s
with 1 and with 8 concurrent clients.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["The river", "def add(a, b):", "Once upon a time", "The capital of", "import os\n",
           "In the morning the", "for i in range(", "The old town"]


class CheckFailed(RuntimeError):
    """The deployment answered, but not as an OpenAI server must."""


def _client(base_url: str, api_key: str | None):
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=0, timeout=120)


def smoke(base_url: str, api_key: str | None, max_tokens: int) -> dict:
    import openai

    client = _client(base_url, api_key)
    (model,) = client.models.list().data
    completion = client.completions.create(model=model.id, prompt=PROMPTS[0], max_tokens=max_tokens, temperature=0)
    text = completion.choices[0].text
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=model.id, prompt=PROMPTS[0], max_tokens=max_tokens, temperature=0, stream=True) if chunk.choices)
    if streamed != text:
        raise CheckFailed(f"streamed completion {streamed!r} differs from the non-streamed {text!r}")
    checks = {"model": model.id, "completion_tokens": completion.usage.completion_tokens, "stream_equal": True}
    if (model.model_extra or {}).get("chat_template"):
        chat = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hello!"}],
                                              max_tokens=max_tokens, temperature=0)
        checks["chat_finish_reason"] = chat.choices[0].finish_reason
    else:
        checks["chat_finish_reason"] = "skipped: the model has no chat template"
    try:
        client.completions.create(model=model.id, prompt=PROMPTS[0], max_tokens=max_tokens, temperature=-1)
    except openai.BadRequestError as exc:
        checks["bad_request"] = exc.status_code
    else:
        raise CheckFailed("temperature=-1 was accepted; expected a 400")
    client.completions.create(model=model.id, prompt=PROMPTS[1], max_tokens=1)
    checks["lineage"] = (model.model_extra or {}).get("lineage", {})
    return checks


def time_to_first_token(base_url: str, api_key: str | None, model: str, rounds: int = 3) -> float:
    """Median seconds from sending a streamed request to its first text."""
    client = _client(base_url, api_key)
    times = []
    for i in range(rounds):
        start = time.perf_counter()
        for chunk in client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=8,
                                               temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter() - start)
                break
    return sorted(times)[len(times) // 2]


def tokens_per_second(base_url: str, api_key: str | None, model: str, concurrency: int, max_tokens: int,
                      requests_per_client: int = 2) -> float:
    """Aggregate completion tokens/s with `concurrency` clients sending requests back to back."""
    client = _client(base_url, api_key)

    def one_client(index: int) -> int:
        total = 0
        for j in range(requests_per_client):
            prompt = PROMPTS[(index + j) % len(PROMPTS)]
            total += client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                               temperature=0.8, seed=index * 100 + j).usage.completion_tokens
        return total

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one_client, range(concurrency)))
    return tokens / (time.perf_counter() - start)
