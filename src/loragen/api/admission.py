"""Admission control: a bounded queue in front of each engine, as vLLM and LoRAX bound theirs.

An engine (the generation thread; the completion thread) works on at most `max_concurrent`
requests at once (the micro-batcher coalesces them) and keeps at most `max_queued` more waiting,
first come first served. Past that a request is refused at once with `Overloaded`, which the API
answers 429 with a `Retry-After` estimated from how long recent requests held their slot. While
the service is still loading, requests are refused the same way (503). A waiting request whose
client goes away, or whose deadline passes, leaves the queue: its work never reaches the engine.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from ..errors import Overloaded
from .metrics import Metrics

# How fast the estimate of a slot's holding time follows new requests (exponential moving average).
HOLD_SMOOTHING = 0.2


class Admission:
    """`async with admission.slot(): ...` holds one of `max_concurrent` slots, waiting in a queue of at
    most `max_queued` for one; `ready()` false refuses at once (the service is still loading)."""

    def __init__(self, engine: str, max_concurrent: int, max_queued: int, metrics: Metrics,
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.engine, self.max_concurrent, self.max_queued = engine, max(1, max_concurrent), max(0, max_queued)
        self.metrics, self.ready = metrics, ready
        self.active = 0
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.hold_s = 1.0  # estimate of how long a request holds its slot
        metrics.queue_state(engine, self._depth, lambda: self.active)

    def _depth(self) -> int:
        return len(self.waiting)

    def retry_after(self) -> int:
        """Seconds until the queue ahead of a new request is likely to have drained (at least 1)."""
        ahead = self._depth() + self.active
        return max(1, math.ceil(self.hold_s * ahead / self.max_concurrent))

    def check_ready(self) -> None:
        if not self.ready():
            self.metrics.refused("not_ready")
            raise Overloaded("the service is still loading (see /readyz); retry shortly", 1, "not_ready")

    def _refuse(self) -> None:
        self.check_ready()
        if self.active < self.max_concurrent and not self._depth():
            return
        if self._depth() >= self.max_queued:
            self.metrics.refused("queue_full")
            retry = self.retry_after()
            raise Overloaded(f"the {self.engine} engine is busy: {self.active} requests running and "
                             f"{self._depth()} queued (max_queued_requests={self.max_queued}); retry after "
                             f"{retry} s", retry, "queue_full")

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self._refuse()
        if self.active < self.max_concurrent and not self._depth():
            self.active += 1
            self.metrics.queue_wait(self.engine, 0.0)
        else:
            await self._wait()
        started = time.monotonic()
        try:
            yield
        finally:
            held = time.monotonic() - started
            self.hold_s += HOLD_SMOOTHING * (held - self.hold_s)
            self._release()

    async def _wait(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        queued = time.monotonic()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # the slot was handed over just as the request was cancelled
            else:
                future.cancel()
                self.waiting.remove(future)
            self.metrics.dropped(self.engine)
            raise
        self.metrics.queue_wait(self.engine, time.monotonic() - queued)

    def _release(self) -> None:
        """Hand the slot to the first live waiter, else free it."""
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(None)
                return
        self.active -= 1
