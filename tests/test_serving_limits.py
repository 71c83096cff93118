"""Limits on every input and no way to wedge a replica, over real HTTP (the `openai` client and raw
requests) against one `tinyllama serve` for the module.

Overload and failure are built on purpose through the replica's test hooks (serving/faults.py):
the engine paused so its slots and queue stay full, requests held at the door so the replica's
`max_ongoing_requests` fills and Serve's proxy queue behind it, a step that raises. Nothing here
waits for the clock to line up; a wait is always for a state the server reports.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
from contextlib import contextmanager
from pathlib import Path

import pytest
from serving_server import API_KEY, serving

SLOTS, WAITING, QUEUED, RETRY_AFTER = 2, 2, 4, 3
MAX_PROMPT, MAX_STOP = 64, 32
NAME = "limits"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def server(served_model_dir, tmp_path_factory, faults):
    from serving.faults import ENV

    flags = ["--name", NAME, "--draft", "prompt-lookup", "--slots", str(SLOTS), "--max-waiting", str(WAITING),
             "--cpus", "1",
             "--max-queued-requests", str(QUEUED), "--retry-after-s", str(RETRY_AFTER),
             "--max-prompt-tokens", str(MAX_PROMPT), "--max-stop-chars", str(MAX_STOP)]
    with serving(served_model_dir, tmp_path_factory.mktemp("serve"), *flags, env={ENV: str(faults)}) as server:
        yield server


@contextmanager
def fault(directory: Path, name: str):
    (directory / name).touch()
    try:
        yield
    finally:
        (directory / name).unlink(missing_ok=True)


def wait_for(server, predicate, timeout: float = 120.0) -> dict:
    """Poll /health until `predicate(body)` holds (a state, not a duration); the body then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            health = server.health()
        except OSError as exc:  # 503 while a replica is replaced, or the proxy between replicas
            health = {"status": "unreachable", "error": str(exc)}
        if predicate(health):
            return health
        assert time.monotonic() < deadline, f"/health never reached the state; last: {health}"
        time.sleep(0.2)


def log_offsets(server) -> dict[Path, int]:
    return {p: len(p.read_text(errors="replace")) for p in server.replica_logs()}


def new_errors(server, offsets: dict[Path, int]) -> list[str]:
    """Error lines and tracebacks the replicas logged past `offsets`."""
    text = "".join(p.read_text(errors="replace")[offsets.get(p, 0):] for p in server.replica_logs())
    return [line for line in text.splitlines() if line.startswith("ERROR") or "Traceback" in line
            or "already running" in line]


def all_logs(server) -> str:
    return "".join(p.read_text(errors="replace") for p in server.temp_root.rglob("*")
                   if p.is_file() and p.suffix in (".log", ".out", ".err"))


def test_a_non_loopback_host_without_a_key_refuses_to_start(served_model_dir, capsys):
    from tasks.cli import main as cli

    assert cli(["serve", "--model", str(served_model_dir), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key-env: required with --host 0.0.0.0" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_inputs_past_the_limits_are_4xx_naming_the_field(server):
    import httpx
    import openai

    from model.tokenizer import Tokenizer

    client = server.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=NAME, prompt="The river", max_tokens=4, stop=["ok", "x" * (MAX_STOP + 1)])
    assert bad.value.body["param"] == "stop" and f"at most {MAX_STOP}" in bad.value.body["message"]

    long_prompt = " ".join(["the river and the mill"] * 20)
    assert len(Tokenizer.load(server.model_dir).encode(long_prompt, bos=True)) > MAX_PROMPT
    code, reply = server.post("/v1/completions", json.dumps({"model": NAME, "prompt": long_prompt}).encode())
    assert code == 400 and reply["error"]["param"] == "prompt", reply
    assert "max_prompt_tokens" in reply["error"]["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": long_prompt}], max_tokens=4)
    assert bad.value.body["param"] == "messages"

    ten_mb = json.dumps({"model": NAME, "prompt": "x" * (10 << 20)}).encode()
    with httpx.Client(timeout=60) as http:
        declared = http.post(f"{server.url}/v1/completions", content=ten_mb, headers=AUTH)
        chunked = http.post(f"{server.url}/v1/completions", headers=AUTH,
                            content=(ten_mb[i:i + (1 << 16)] for i in range(0, len(ten_mb), 1 << 16)))
    for response in (declared, chunked):
        assert response.status_code == 413, response.text[:300]
        assert "request body larger than" in response.json()["error"]["message"]
    assert client.completions.create(model=NAME, prompt="still there?", max_tokens=2).usage.completion_tokens


@pytest.mark.slow
def test_a_full_replica_is_refused_with_429_and_retry_after_at_every_layer(server, faults):
    """The engine's layer: with its steps paused, SLOTS + WAITING sequences fill it and the next request
    is a 429 at once. Serve's layer: with requests held at the door too, the replica reaches its
    max_ongoing_requests, the proxy queues QUEUED more and refuses the rest with 429 + Retry-After."""
    import httpx
    import openai

    from serving.app import ONGOING_MARGIN
    from serving.faults import HOLD, PAUSE

    ongoing = SLOTS + WAITING + ONGOING_MARGIN
    extra = 3

    async def ask(http, i: int):
        return await http.post(f"{server.url}/v1/completions", headers=AUTH, timeout=300,
                               json={"model": NAME, "prompt": f"Line {i}", "max_tokens": 4})

    async def scenario():
        async with httpx.AsyncClient() as http:
            with fault(faults, PAUSE):
                engine_held = [asyncio.create_task(ask(http, i)) for i in range(SLOTS + WAITING)]
                await asyncio.to_thread(wait_for, server, lambda h: h.get("running", 0) + h.get("waiting", 0)
                                        == SLOTS + WAITING)
                with pytest.raises(openai.RateLimitError) as busy:
                    await server.async_client().completions.create(model=NAME, prompt="one more", max_tokens=4)
                with fault(faults, HOLD):
                    door = [asyncio.create_task(ask(http, 100 + i)) for i in range(ongoing - SLOTS - WAITING + QUEUED
                                                                                    + extra)]
                    done, _ = await asyncio.wait(door, return_when=asyncio.FIRST_COMPLETED)
                    refused_early = [t.result() for t in done]
            return busy.value, refused_early, await asyncio.gather(*engine_held, *door)

    busy, refused_early, replies = asyncio.run(scenario())
    assert busy.status_code == 429 and busy.response.headers["retry-after"] == str(RETRY_AFTER)
    assert busy.body["code"] == "server_busy" and "waiting" in busy.body["message"]
    assert refused_early and all(r.status_code == 429 for r in refused_early)
    by_serve = [r for r in replies if r.status_code == 429 and "server_busy" not in r.text]
    by_engine = [r for r in replies if r.status_code == 429 and "server_busy" in r.text]
    answered = [r for r in replies if r.status_code == 200]
    assert len(by_serve) + len(by_engine) + len(answered) == len(replies), [r.text[:200] for r in replies]
    # Serve's layer refused some, and at least `extra` were refused in all. How many of the `extra` Serve itself
    # refuses depends on when the proxy learns the replica's count, which the test does not control (seen
    # once in three runs: 2 of 3).
    assert by_serve and len(by_serve) + len(by_engine) >= extra, [r.text[:200] for r in replies]
    assert all(r.headers.get("retry-after") == str(RETRY_AFTER) for r in by_serve + by_engine)
    assert len(answered) >= SLOTS + WAITING and all(r.json()["choices"][0]["text"] is not None for r in answered)
    assert wait_for(server, lambda h: h.get("running") == 0 and h.get("waiting") == 0)["status"] == "ok"


@pytest.mark.slow
def test_a_client_leaving_an_n3_stream_frees_every_slot_and_logs_no_error(server, faults):
    import httpx

    from serving.faults import PAUSE

    offsets = log_offsets(server)
    body = {"model": NAME, "messages": [{"role": "user", "content": "Tell me about the river"}], "n": 3,
            "max_tokens": 50, "stream": True}
    with fault(faults, PAUSE), httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH) as response:
            assert response.status_code == 200
            assert next(response.iter_lines()).startswith("data: ")  # the role chunk: three sequences submitted
            health = server.health()
            assert health["running"] + health["waiting"] == 3, health
    # the client has left while the engine held all three mid-way; the engine resumes
    health = wait_for(server, lambda h: h.get("running") == 0 and h.get("waiting") == 0)
    assert health["status"] == "ok"
    assert server.client().completions.create(model=NAME, prompt="after", max_tokens=2).usage.completion_tokens == 2
    assert server.replica_logs() and not new_errors(server, offsets)


@pytest.mark.slow
def test_the_grafana_dashboard_charts_metrics_the_server_exports(server):
    """After the requests above (answered, refused, 413s), every metric the dashboard queries is exported."""
    import re
    import urllib.request

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "infra" / "grafana" / "tinyllama-serving.json")
                           .read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    wanted = {re.sub(r"_bucket$", "", name) for expr in exprs for name in re.findall(r"\bray_[a-z_]+", expr)}
    wanted.discard("ray_tinyllama_spec_acceptance_rate")  # set once a draft has proposed tokens, which may not happen
    assert {"ray_tinyllama_num_requests_running", "ray_tinyllama_kv_cache_usage_perc"} <= wanted
    deadline, missing = time.monotonic() + 90, wanted
    while missing:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            exported = {line.split("{")[0].split(" ")[0] for line in response.read().decode().splitlines()
                        if not line.startswith("#")}
        missing = {name for name in wanted if not {name, f"{name}_bucket"} & exported}
        assert time.monotonic() < deadline or not missing, f"not exported: {sorted(missing)}"
        time.sleep(2 if missing else 0)


@pytest.mark.slow
def test_an_engine_failure_is_a_500_then_unhealthy_then_a_new_replica(server, faults):
    """Last in the module: it takes the replica down (Serve replaces it)."""
    import openai

    from serving.faults import FAIL_STEP

    before = server.health()["replica"]
    (faults / FAIL_STEP).touch()
    with pytest.raises(openai.InternalServerError) as failed:
        server.client().completions.create(model=NAME, prompt="The river", max_tokens=8)
    assert failed.value.status_code == 500 and failed.value.body["code"] == "engine_failed"
    assert "engine failed" in failed.value.body["message"] and "injected" not in json.dumps(failed.value.body)
    with pytest.raises(urllib.error.HTTPError) as unhealthy:
        server.health()  # Serve checks every 10 s: until it does, the failed replica answers for itself
    assert unhealthy.value.code == 503
    assert json.loads(unhealthy.value.read()) == {"status": "failed", "error": "engine failed", "replica": before}
    health = wait_for(server, lambda h: h.get("status") == "ok" and h.get("replica") != before, timeout=240)
    assert health["running"] == 0
    assert server.client().completions.create(model=NAME, prompt="The river", max_tokens=4).usage.completion_tokens
    assert "injected engine failure" in all_logs(server)  # the reason: in the replica's log, not in a reply
