"""Test hooks that put a replica into an overload or failure state on purpose, so tests build those
states by construction instead of racing the clock. Inert unless the replica's environment sets
`TINYLLAMA_FAULTS` to a directory; then a file in it switches a fault on:

  hold       requests wait at the API's door while it exists (the replica fills up with ongoing requests)
  pause      the engine's steps wait while it exists (its slots and queue fill up; streams stay mid-way)
  fail-step  the engine's next step raises (the file is consumed: one failure, then the replacement serves)
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

ENV = "TINYLLAMA_FAULTS"
HOLD = "hold"
PAUSE = "pause"
FAIL_STEP = "fail-step"
_POLL_S = 0.05


def _directory() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


async def hold_requests() -> None:
    directory = _directory()
    while directory is not None and (directory / HOLD).exists():
        await asyncio.sleep(_POLL_S)


def faulty_step(step: Callable[[], list]) -> Callable[[], list]:
    """`step` itself without the hook; with it, a step that waits while `pause` exists and raises
    once `fail-step` appears."""
    directory = _directory()
    if directory is None:
        return step

    def maybe_fail() -> list:
        while (directory / PAUSE).exists():
            time.sleep(_POLL_S)
        try:
            (directory / FAIL_STEP).unlink()
        except FileNotFoundError:
            return step()
        raise RuntimeError("injected engine failure (test hook)")

    return maybe_fail
