"""Ray and Serve for the serving commands: a local Ray sized explicitly, or the cluster at `RAY_ADDRESS`.

Locally Ray gets an explicit CPU count and a private temp dir (its sockets live there), and Serve's
HTTP proxy binds the host and port asked for (127.0.0.1 unless told otherwise). Everything started
here is stopped on exit, so a test or a pipeline stage leaves no Ray behind.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

APPLICATION = "tinyllama"


@contextmanager
def serve_session(cpus: int, host: str, port: int, dashboard_port: int | None = None, metrics_port: int | None = None,
                  local: bool = False):
    """Ray (local unless RAY_ADDRESS is set, or always with `local`) + Serve's proxy on host:port for the block,
    which gets the local Ray's temp dir (its logs are under it; None on a cluster); the dashboard
    (which `serve deploy` talks to) only when `dashboard_port` is given; Prometheus metrics (Ray's and
    Serve's, ours included) at `metrics_port`'s /metrics when given, else on a port Ray picks."""
    import ray
    from ray import serve

    from tasks.ray_cluster import start_ray

    temp_dir = start_ray(cpus, dashboard_port=dashboard_port, metrics_port=metrics_port, local=local)
    try:
        serve.start(http_options={"host": host, "port": port})
        yield temp_dir
    finally:
        if temp_dir is None:
            serve.delete(APPLICATION)  # a cluster's Serve stays up for its other applications
        ray.shutdown()  # a local Ray takes its Serve with it
        if temp_dir:
            _remove(Path(temp_dir))


def _remove(directory: Path, patience_s: float = 10.0) -> None:
    """Delete Ray's temp dir. Ray's helper processes can still be flushing logs into it for a moment
    after shutdown (all the more when a SIGTERM to the process group reached them too), so retry
    until it stays gone."""
    deadline = time.monotonic() + patience_s
    while directory.exists() and time.monotonic() < deadline:
        shutil.rmtree(directory, ignore_errors=True)
        time.sleep(0.2)


def wait_healthy(url: str, timeout: float) -> float:
    """Poll `url` (the app's /health) until it answers 200; returns the seconds it took. A replica
    whose load failed answers 503 with status "failed": that ends the wait with its reason."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code == 503 and body.startswith(b"{") and json.loads(body).get("status") == "failed":
                raise RuntimeError(json.loads(body).get("error")) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")
