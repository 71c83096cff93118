"""What a stage prints, and where the rest goes: logs are for people.

The console (a terminal, or the Prefect task log that runs the stage) gets the stage's own lines:
its summary, progress every few seconds, one line per milestone eval. Everything else a run
produces (library logging from MLflow, lm-eval, transformers, Ray's driver; Python warnings) goes
to `logs/<stage>.log`, whose path the stage prints first, together with those same lines. Ray
workers' own output lands in `logs/<stage>-ray/` (tasks/ray_cluster.py). Progress bars are for
terminals only: without one (Prefect, CI, a pipe) `progress` prints a line every few seconds instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from tasks.layout import Layout
from tasks.params import Params

# Libraries that attach their own console handlers; their records go to the stage's log file instead.
# MLflow and Ray attach theirs when first imported, hence `adopt_library_logging` right after that.
LIBRARY_LOGGERS = ("mlflow", "ray", "lm_eval", "lm-eval", "transformers", "datasets", "urllib3", "fsspec",
                   "s3fs", "botocore", "filelock", "alembic", "huey", "sqlalchemy.engine", "httpx", "torch")
PROGRESS_EVERY_S = 15.0
_stage_handler: logging.Handler | None = None  # the running stage's log file, if any


class _Tee:
    """A text stream that writes to the console stream and the log file alike (the console only, once
    the stage is over: a handler created meanwhile may still hold this stream)."""

    def __init__(self, console, file):
        self.console, self.file = console, file

    def write(self, text: str) -> int:
        if not self.file.closed:
            self.file.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        if not self.file.closed:
            self.file.flush()
        self.console.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def __getattr__(self, name):
        return getattr(self.console, name)


def log_file(layout: Layout, stage: str) -> Path:
    return layout.logs_dir / f"{stage}.log"


def interactive() -> bool:
    """A person watches a terminal: progress bars are welcome there and only there."""
    return sys.stderr.isatty()


def quiet_progress_bars() -> None:
    """Progress bars (lm-eval's, datasets', transformers') only on a terminal. tqdm binds TQDM_DISABLE when it
    is first imported, so the CLI calls this before it imports a stage's libraries, not when the log starts."""
    if not interactive():
        os.environ.setdefault("TQDM_DISABLE", "1")


def _route_library_logging(handler: logging.Handler) -> list[tuple[logging.Logger, list, bool]]:
    """Every record to `handler` (the log file) through the root logger; returns what to restore.
    Levels stay each library's own (SQLAlchemy's engine stays at WARNING, say)."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in LIBRARY_LOGGERS)]
    saved = [(logger, list(logger.handlers), logger.propagate) for logger in loggers]
    root = loggers[0]
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    adopt_library_logging(*LIBRARY_LOGGERS)
    logging.captureWarnings(True)
    return saved


def adopt_library_logging(*names: str) -> None:
    """Inside a stage, send these libraries' records to its log file instead of their own console handlers.
    Call it right after importing a library that installs handlers on import (MLflow, Ray)."""
    if _stage_handler is None:
        return
    for name in names:
        library = logging.getLogger(name)
        library.handlers[:] = []
        library.propagate = True


@contextmanager
def stage_log(stage: str, params: Params) -> Iterator[Path]:
    """Run a stage with its console kept to its own lines and the full detail in `logs/<stage>.log`."""
    path = log_file(Layout.from_params(params), stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet_progress_bars()
    global _stage_handler
    saved_stdout = sys.stdout
    with open(path, "a", encoding="utf-8", buffering=1) as file:
        file.write(f"\n===== {stage} {datetime.now().isoformat(timespec='seconds')} =====\n")
        _stage_handler = logging.StreamHandler(file)
        _stage_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        saved_loggers = _route_library_logging(_stage_handler)
        sys.stdout = _Tee(saved_stdout, file)
        print(f"{stage}: full log in {path}", flush=True)
        try:
            yield path
        finally:
            sys.stdout = saved_stdout
            _stage_handler = None
            for logger, handlers, propagate in saved_loggers:
                logger.handlers[:], logger.propagate = handlers, propagate
            logging.captureWarnings(False)


class _PeriodicLines:
    """tqdm's interface, printing `desc: n/total (rate)` every PROGRESS_EVERY_S seconds and at the end."""

    def __init__(self, total: float | None, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.started = 0.0, time.monotonic()
        self.last = self.started
        self.postfix = ""

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self._line()

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self) -> None:
        self.last = time.monotonic()
        rate = self.n / max(self.last - self.started, 1e-9)
        done = f"{self.n:,.0f}/{self.total:,.0f}" if self.total else f"{self.n:,.0f}"
        print(f"{self.desc}: {done} {self.unit} "
              f"({rate:,.0f} {self.unit}/s{', ' + self.postfix if self.postfix else ''})",
              flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.last != self.started or time.monotonic() - self.started >= PROGRESS_EVERY_S:
            self._line()


def progress(total: float | None, desc: str, unit: str = "it"):
    """A tqdm bar on a terminal, periodic lines elsewhere; use as a context manager with `update(n)`."""
    if interactive():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, mininterval=1.0)
    return _PeriodicLines(total, desc, unit)
