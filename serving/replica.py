"""What a replica process holds for the app's module-level hooks: the request limits the body-size
middleware reads, and the service the ASGI lifespan's shutdown closes.

A module of its own for the reason serving/auth.py gives: Ray Serve ships the ingress class by value
but imports modules by reference, so the constructor and the hooks meet here, in one copy.
"""

from __future__ import annotations

from typing import Protocol

from serving.protocol import Limits


class Closable(Protocol):
    def close(self) -> None: ...


limits = Limits()
_open: list[Closable] = []


def configure(replica_limits: Limits) -> None:
    global limits
    limits = replica_limits


def opened(service: Closable) -> None:
    _open.append(service)


def shutdown() -> None:
    """Close what this replica opened (its engine thread, its tokenizing thread)."""
    while _open:
        _open.pop().close()
