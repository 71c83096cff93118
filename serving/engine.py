"""The engine loop: one thread steps the batched decoder; requests join and leave between steps.

Why a thread: a decode step is a torch forward that releases the GIL, so the server's event loop
keeps accepting, streaming and noticing disconnects while the model computes. Only this thread
touches the decoder; the event loop talks to it through two thread-safe inboxes (new sequences,
cancellations) and receives each step's tokens on a per-sequence asyncio queue.

Scheduling: a submitted sequence waits in a bounded FIFO until a slot is free (`QueueFull` past
`max_waiting`, which the HTTP layer turns into 429), then joins the running batch at the next step;
its prompt is prefilled in chunks between decode steps (model/decoder.py). A cancelled sequence
(a client that disconnected, a stop string reached) leaves at the next step and frees its slot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from model.decoder import BatchDecoder, Event
from model.sampling import Sampling

logger = logging.getLogger("tinyllama.serving")


class QueueFull(Exception):
    """More sequences are waiting than the engine accepts."""


class EngineFailed(Exception):
    """The engine thread died: this replica serves nothing more until Serve replaces it."""


FAILED = "error"  # the `finish` of every sequence the engine ended because it failed


@dataclass
class Submitted:
    """One sequence a request asked for, as the event loop sees it."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    eos_id: int | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None

    def deliver(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass
class Observer:
    """Callbacks for metrics (serving/metrics.py); the engine itself keeps no history."""

    on_step: Callable[[int, int], None] = lambda running, waiting: None
    on_events: Callable[[list[tuple[Submitted, Event]], float], None] = lambda events, now: None


class Engine:
    def __init__(self, decoder: BatchDecoder, max_waiting: int, threads: int | None = None,
                 observer: Observer | None = None):
        self.decoder, self.max_waiting, self.threads = decoder, max_waiting, threads
        self.observer = observer or Observer()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Submitted] = deque()
        self._cancelled: list[Submitted] = []
        self._running: dict[int, Submitted] = {}
        self._stopped = False
        self.error: str | None = None  # why the engine thread died (for the replica's log and health check)
        self._thread = threading.Thread(target=self._run, name="tinyllama-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def failed(self) -> bool:
        return self.error is not None

    def submit(self, requests: list[Submitted]) -> None:
        """Queue sequences (all of one HTTP request, or none of them: `QueueFull`)."""
        with self._wake:
            if self.error is not None:
                raise EngineFailed("engine failed")
            free_slots = self.decoder.slots - len(self._running)  # those the next step admits at once
            if len(self._waiting) + len(requests) > self.max_waiting + free_slots:
                raise QueueFull(f"server busy: {len(self._waiting)} sequences already waiting "
                                f"(limit {self.max_waiting}); retry later")
            self._waiting.extend(requests)
            self._wake.notify()

    def cancel(self, request: Submitted) -> None:
        """Stop a sequence; it leaves the batch at the next step (a no-op once it has finished)."""
        with self._wake:
            if not request.cancelled:
                request.cancelled = True
                self._cancelled.append(request)
                self._wake.notify()

    async def stream(self, request: Submitted) -> AsyncIterator[Event]:
        """The sequence's events until it finishes; leaving early (disconnect) cancels it. Events that
        piled up while the consumer was busy come as one, so a loaded server sends fewer, larger chunks."""
        try:
            while True:
                event = await request.queue.get()
                while not request.queue.empty() and event.finish is None:
                    event = event.merge(request.queue.get_nowait())
                yield event
                if event.finish is not None:
                    return
        finally:
            self.cancel(request)

    def stop(self) -> None:
        """End the engine thread (the replica's shutdown hook); sequences still running get no more tokens."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _admit(self) -> None:
        """Under the lock: apply cancellations, then fill free slots from the queue's head."""
        for request in self._cancelled:
            if request.seq_id is not None:
                self.decoder.cancel(request.seq_id)
                self._running.pop(request.seq_id, None)
            elif request in self._waiting:
                self._waiting.remove(request)
        self._cancelled.clear()
        while self._waiting and self.decoder.has_free_slot():
            request = self._waiting.popleft()
            request.seq_id = self.decoder.add(request.prompt, request.max_tokens, request.sampling, request.eos_id)
            self._running[request.seq_id] = request

    def _run(self) -> None:
        """The thread's body: any exception (a step, an admission) ends every sequence it holds with
        `FAILED` and marks the engine failed, so no request hangs and the replica reports unhealthy."""
        try:
            self._loop()
        except BaseException as exc:
            logger.exception("the engine thread failed; ending %d running and %d waiting sequences",
                             len(self._running), len(self._waiting))
            with self._wake:
                self.error = f"{type(exc).__name__}: {exc}"
                ended = [*self._running.values(), *self._waiting]
                self._running.clear()
                self._waiting.clear()
            for request in ended:
                request.deliver(Event(-1 if request.seq_id is None else request.seq_id, finish=FAILED))

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                self._admit()
                while not self._running and not self._stopped:
                    self.observer.on_step(0, len(self._waiting))
                    self._wake.wait()
                    self._admit()
                if self._stopped:
                    return
                self.observer.on_step(len(self._running), len(self._waiting))
            events = self.decoder.step()
            now = time.monotonic()
            delivered = []
            with self._wake:
                for event in events:
                    request = self._running.get(event.seq_id)
                    if request is None:
                        continue
                    if event.finish is not None:
                        del self._running[event.seq_id]
                    request.deliver(event)
                    delivered.append((request, event))
            self.observer.on_events(delivered, now)
