"""`tinyllama serve` as a user starts it, for the serving tests: real HTTP on 127.0.0.1, a bearer key,
Prometheus metrics on a port of their own; stopped (Ray and Serve with it) when the block ends."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from servers import free_port, start, stop, wait_http

API_KEY_ENV = "TINYLLAMA_TEST_KEY"
API_KEY = "sk-test-3f9c1d0b7e2a"


class Server:
    def __init__(self, url: str, metrics_url: str, log: Path, model_dir: Path, temp_root: Path):
        self.url, self.metrics_url, self.log = url, metrics_url, log
        self.model_dir, self.temp_root = model_dir, temp_root

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=120, **kwargs)

    def async_client(self):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: bytes, key: str | None = API_KEY) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{self.url}{path}", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def replica_logs(self) -> list[Path]:
        """The Serve replicas' own log files (what an operator reads when a request went wrong)."""
        return sorted(self.temp_root.rglob("replica_*.log"))


@contextmanager
def serving(model_dir: Path, work: Path, *flags: str, env: dict | None = None):
    """`tinyllama serve --model model_dir --api-key-env ... FLAGS` until the block ends."""
    port, metrics_port = free_port(), free_port()
    log = work / "serve.log"
    environment = {**os.environ, API_KEY_ENV: API_KEY, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                   **(env or {})}
    command = [str(Path(sys.executable).parent / "tinyllama"), "serve", "--model", str(model_dir), "--port", str(port),
               "--api-key-env", API_KEY_ENV, "--metrics-port", str(metrics_port), *flags]
    proc = start(command, log, env=environment)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 300, proc, log)
        deadline = time.monotonic() + 60
        while "ready in" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        ray_logs = Path(log.read_text().split("Ray and replica logs: ")[1].split()[0])
        yield Server(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", log, model_dir, ray_logs)
    finally:
        stop(proc, grace=60)
