"""Screenshots of the MLflow UI for the README, taken from a real run with headless Chromium.

  .venv/bin/python docs/screenshots.py                 # this checkout's store (after `make run`)
  .venv/bin/python docs/screenshots.py --root DIR      # another workspace's store

Starts `mlflow server` on the workspace's local store (mlflow/mlflow.db + mlflow/artifacts) on a free
local port, opens the pretrain run's eval/avg chart (score against tokens seen) and the run's model
metrics in Debian's `chromium` driven by Playwright (`pip install playwright==1.65.2`; its own browser
download is not needed; `.venv/bin/pip install -e ".[docs]"`), writes PNGs to docs/img/, and stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_TRAINING_VIEW = "workflowType=machine_learning"  # the UI's view of runs and metric charts (not GenAI's)
# Chromium in a closed network: no background connections, no first-run UI, no sandbox as root.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _wait(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s")


def _pretrain_run(base: str, root: Path) -> tuple[str, str]:
    import yaml

    experiment_name = yaml.safe_load((root / "params.yaml").read_text())["mlflow"]["experiment"]
    query = urllib.parse.urlencode({"experiment_name": experiment_name})
    experiment = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]
    run_id = json.loads((root / "metrics" / "pretrain.json").read_text())["mlflow_run_id"]
    return experiment["experiment_id"], run_id


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an "MLflow Assistant" side panel by default; it hides a third of the charts."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def screenshots(root: Path, out_dir: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    store = root / "mlflow"
    if not (store / "mlflow.db").is_file():
        raise SystemExit(f"{store / 'mlflow.db'}: no MLflow store (run `make run` first)")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{store / 'mlflow.db'}", "--default-artifact-root", str(store / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        _wait(f"{base}/health", 240)
        experiment_id, run_id = _pretrain_run(base, root)
        charts = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{MODEL_TRAINING_VIEW}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # The UI's view (GenAI or model training) is a per-browser choice: the link the pipeline prints picks it.
            page.goto(f"{base}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}", wait_until="load")
            page.wait_for_timeout(6000)
            _close_assistant(page)
            page.screenshot(path=str(out_dir / "mlflow-experiment.png"))
            written.append(out_dir / "mlflow-experiment.png")
            for name, search in (("mlflow-score-vs-tokens.png", "eval/"), ("mlflow-training-curves.png", "")):
                page.goto(charts, wait_until="load")
                page.wait_for_timeout(6000)  # the UI keeps polling (never network-idle); the charts draw meanwhile
                _close_assistant(page)
                page.get_by_placeholder("Search metric charts").fill(search)  # the UI keeps the last search
                page.wait_for_timeout(2000)
                page.screenshot(path=str(out_dir / name))
                written.append(out_dir / name)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the workspace whose MLflow store to show")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    for path in screenshots(args.root.resolve(), args.out):
        print(path)


if __name__ == "__main__":
    main()
