"""The OpenAI-compatible server over real HTTP on 127.0.0.1, through the official `openai` client,
started as users start it (`tinyllama serve`, Ray Serve underneath), one server for the module.

The server drafts by prompt lookup, so every greedy answer compared here with the target's own
`model.generate.generate` also shows speculative decoding is exact end to end; 4 slots and 28
queue places make 32 sequences fit exactly and one more is a 429; it streams two
tokens per chunk (the deploy stage's test covers the default of one).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
from serving_server import API_KEY, serving

pytestmark = pytest.mark.slow

SLOTS, WAITING = 4, 28
NAME = "tiny-chat"


@pytest.fixture(scope="module")
def server(served_model_dir, tmp_path_factory):
    flags = ["--name", NAME, "--draft", "prompt-lookup", "--slots", str(SLOTS), "--max-waiting", str(WAITING),
             "--cpus", "2", "--stream-interval", "2",
             # Serve's proxy may hold a cold replica's requests before its router learns the replica's room: let
             # it hold all 32 of the burst below (its default 16 answered 429 when that test ran first)
             "--max-queued-requests", str(SLOTS + WAITING)]
    with serving(served_model_dir, tmp_path_factory.mktemp("serve"), *flags) as server:
        yield server


def greedy_text(local, prompt_ids: list[int], max_tokens: int) -> str:
    from model.generate import generate

    model, tokenizer = local
    out = generate(model, prompt_ids, max_tokens, eos_id=tokenizer.eos_id)
    return tokenizer.decode(prompt_ids + out)[len(tokenizer.decode(prompt_ids)):]


def chat_ids(local, messages: list[dict]) -> list[int]:
    from model.chat import render, template

    return local[1].encode_chat(render(template("zephyr").source, messages, add_generation_prompt=True).text)[0]


def test_health_and_models_with_lineage(server):
    assert server.health()["status"] == "ok"
    (model,) = server.client().models.list().data
    assert model.id == NAME
    extra = model.model_extra
    assert extra["max_model_len"] == 256 and extra["chat_template"] is True
    assert extra["lineage"] == {"base_milestone": "1M", "variant": "test"}


def test_completion_is_the_targets_greedy_text_and_streaming_equals_it(server, local):
    client = server.client()
    prompt = "The river flows past the old mill"
    expected = greedy_text(local, local[1].encode(prompt, bos=True), 40)
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == len(local[1].encode(prompt, bos=True))
    assert reply.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # --stream-interval 2: the first text at once, then chunks of at least two tokens
    assert len([c for c in chunks if c.choices]) <= 2 + reply.usage.completion_tokens // 2


def test_chat_uses_the_models_template_and_streams_the_same(server, local):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the river go?"}]
    expected = greedy_text(local, chat_ids(local, messages), 30)
    reply = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=30, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == expected


def test_stop_sequences_end_the_text_before_them(server, local):
    client = server.client()
    prompt = "def add(a, b):"
    full = greedy_text(local, local[1].encode(prompt, bos=True), 40)
    stop = full[10:13]
    assert stop and full.index(stop) >= 1
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "zzzz"])
    assert reply.choices[0].text == full[:full.index(stop)] and reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.text for c in chunks) == full[:full.index(stop)] and chunks[-1].finish_reason == "stop"


def test_seed_reproduces_a_sample_and_n_gives_distinct_choices(server):
    client = server.client()
    kwargs = dict(model=NAME, prompt="Once upon a time", max_tokens=24, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=7, **kwargs).choices[0].text
    assert client.completions.create(seed=7, **kwargs).choices[0].text == a
    assert client.completions.create(seed=8, **kwargs).choices[0].text != a
    many = client.completions.create(seed=7, n=3, **kwargs)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == a and len({c.text for c in many.choices}) == 3
    assert many.usage.completion_tokens == 3 * 24
    streamed = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2,
                                              max_tokens=10, temperature=1.0, seed=3, stream=True)
    assert {c.choices[0].index for c in streamed if c.choices} == {0, 1}


def test_32_concurrent_requests_are_all_answered_correctly(server, local):
    prompts = [f"Item {i}: the {['river', 'town', 'mill', 'road'][i % 4]} is" for i in range(32)]
    expected = [greedy_text(local, local[1].encode(p, bos=True), 20) for p in prompts]

    async def ask_all():
        client = server.async_client()
        replies = await asyncio.gather(*(client.completions.create(model=NAME, prompt=p, max_tokens=20, temperature=0)
                                         for p in prompts))
        await client.close()
        return [r.choices[0].text for r in replies]

    assert asyncio.run(ask_all()) == expected


def _wait_idle(server, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = server.health()
        if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


HELD = 240  # tokens each held sequence must decode: it cannot end sooner (see _held_prompt)


def _held_prompt(local) -> str:
    """A prompt whose greedy continuation runs HELD tokens without EOS, so a sequence of it at temperature 0
    holds its slot for HELD decode steps unless it is cancelled."""
    from model.generate import generate

    model, tokenizer = local
    for i in range(20):
        prompt = f"Line {i}: the river"
        if len(generate(model, tokenizer.encode(prompt, bos=True), HELD, eos_id=tokenizer.eos_id)) == HELD:
            return prompt
    raise AssertionError("every prompt tried reaches EOS: no sequence is sure to hold its slot")


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, local):
    import httpx

    assert _wait_idle(server)["running"] == 0
    body = {"model": NAME, "prompt": _held_prompt(local), "max_tokens": HELD, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            while server.health()["running"] != 1:  # it streams, so it runs (HELD tokens: it cannot end first)
                next(lines)
    health = _wait_idle(server)
    assert health["running"] == 0 and health["waiting"] == 0, health


def test_a_full_queue_rejects_with_429_and_freeing_it_recovers(server, local):
    """By construction: four requests of n=8 greedy sequences that cannot end before HELD tokens fill the 4
    slots and 28 queue places, so nothing frees a place for HELD decode steps; a request sent once /health
    shows the queue full is a 429 that says so. Then those clients disconnect, every slot and place is
    freed, and the server answers exactly as before."""
    import httpx

    body = {"model": NAME, "prompt": _held_prompt(local), "max_tokens": HELD, "temperature": 0, "n": 8,
            "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert (SLOTS + WAITING) % body["n"] == 0

    async def fill_probe_release():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as http:
            async def hold():
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    async for _ in response.aiter_lines():
                        pass

            holders = [asyncio.create_task(hold()) for _ in range((SLOTS + WAITING) // body["n"])]
            deadline = time.monotonic() + 120
            while (health := (await http.get("/health")).json())["waiting"] < WAITING:
                assert time.monotonic() < deadline and not any(h.done() for h in holders), health
                await asyncio.sleep(0.02)
            probe = await http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
            for holder in holders:
                holder.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return health, probe

    full, probe = asyncio.run(fill_probe_release())
    assert (full["running"], full["waiting"]) == (SLOTS, WAITING), full
    assert probe.status_code == 429, probe.text
    assert f"{WAITING} sequences already waiting (limit {WAITING})" in probe.json()["error"]["message"]
    health = _wait_idle(server)
    assert health["running"] == 0 and health["waiting"] == 0, health
    prompt = "The river flows past the old mill"
    expected = greedy_text(local, local[1].encode(prompt, bos=True), 20)
    assert server.client().completions.create(model=NAME, prompt=prompt, max_tokens=20,
                                              temperature=0).choices[0].text == expected


LONG_PROMPT = " ".join(["the river and the mill"] * 80)
BAD = [
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [', 400, "not valid JSON", None),
    ("/v1/chat/completions", {"model": NAME}, 400, "messages: required field is missing", "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "at least 1 item", "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": " "}]}, 400,
     "messages.0.content: must be a non-empty string", "messages.0.content"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hello"}, 400, "messages", "messages"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": 7}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": -5}, 400,
     "greater than or equal to 1", "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 10**9}, 400,
     "maximum context length is 256 tokens", "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5},
     400, "temperature", "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": LONG_PROMPT}, 400, "maximum context length is 256 tokens", "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "'gpt-4' does not exist", "model"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "frobnicate": 1}, 400, "unknown field", "frobnicate"),
]


@pytest.mark.parametrize("path, body, status, message, param", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_requests_are_4xx_naming_the_field_and_the_server_goes_on(server, path, body, status, message, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, reply = server.post(path, raw)
    assert code == status, reply
    error = reply["error"]
    assert message in error["message"] and error["param"] == param, error
    assert error["type"] == ("invalid_request_error" if status < 500 else error["type"])
    assert server.client().completions.create(model=NAME, prompt="still there?", max_tokens=2).usage.completion_tokens


def test_a_missing_or_wrong_api_key_is_a_401_and_the_key_is_never_logged(server):
    import openai

    for key in (None, "sk-wrong"):
        code, reply = server.post("/v1/completions", json.dumps({"model": NAME, "prompt": "x"}).encode(), key=key)
        assert code == 401 and "API key" in reply["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        server.client(default_headers={"Authorization": "Bearer nope"}).models.list()
    assert server.health()["status"] == "ok"  # health needs no key (probes)
    logs = [server.log, *(p for p in server.temp_root.rglob("*") if p.suffix in (".log", ".out", ".err"))]
    assert len(logs) > 1
    assert not [p for p in logs if p.is_file() and API_KEY in p.read_text(errors="replace")]


def test_prometheus_metrics_through_ray(server):
    wanted = ["tinyllama_generation_tokens", "tinyllama_prompt_tokens", "tinyllama_num_requests_running",
              "tinyllama_num_requests_waiting", "tinyllama_kv_cache_usage_perc",
              "tinyllama_time_to_first_token_seconds_bucket", "tinyllama_time_per_output_token_seconds_bucket",
              "tinyllama_spec_acceptance_rate"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            text = response.read().decode()
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing
    generated = [line for line in text.splitlines() if line.startswith("ray_tinyllama_generation_tokens")]
    assert generated and float(generated[0].split()[-1]) > 0
