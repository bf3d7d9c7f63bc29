"""Micro-batching: concurrent generation requests are coalesced into one generator call.

One collector task takes the first waiting request, then keeps taking more until `max_batch`, until
`max_wait` has passed, or until the batch is as large as the largest of the last few; it groups
them by what one generator call can share (method, k, seed, samples) and runs each group through
`run`. While a group runs, new requests queue up, so under load the next batch fills without
waiting. A group whose requests cost more together than `max_cost` (e.g. the characters of their
examples) runs as several calls of at most that cost, so that one call holds the engine no longer
than one costly request would; before each call, requests whose client went away are dropped.

`run(jobs, wanted)` gets the jobs of one call and `wanted()`, which says at any moment, from any
thread, which of them still have a client waiting: an engine thread that starts the call after a
client has gone (its deadline passed while the call was queued) skips that row, since the
batcher's own cancellation of the call reaches the engine only a turn of the event loop later.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

# A batch waits (up to max_wait) only until it is as large as the largest of the last few: a lone
# client is answered at once, while under steady load the requests still in flight are waited for
# instead of being left for the next cycle.
RECENT_BATCHES = 8
J = TypeVar("J")
R = TypeVar("R")
Wanted = Callable[[], list[bool]]


class MicroBatcher(Generic[J, R]):
    def __init__(self, run: Callable[[list[J], Wanted], Awaitable[list[R | None]]], key: Callable[[J], Hashable], *,
                 max_batch: int, max_wait_s: float, cost: Callable[[J], int] = lambda job: 0,
                 max_cost: int = 0) -> None:
        self.run, self.key, self.cost, self.max_cost = run, key, cost, max_cost
        self.max_batch, self.max_wait_s = max(1, max_batch), max(0.0, max_wait_s)
        self._queue: asyncio.Queue[tuple[J, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, job: J) -> R:
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((job, future))
        return await future

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        recent: deque[int] = deque(maxlen=RECENT_BATCHES)
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            expected = max(recent, default=self.max_batch)
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0 or len(batch) >= expected:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            recent.append(len(batch))
            groups: dict[Hashable, list[tuple[J, asyncio.Future[R]]]] = {}
            for item in batch:
                groups.setdefault(self.key(item[0]), []).append(item)
            for items in groups.values():
                for chunk in self._chunks(items):
                    await self._run(chunk)

    def _chunks(self, items: list[tuple[J, asyncio.Future[R]]]) -> list[list[tuple[J, asyncio.Future[R]]]]:
        """`items` in order, cut where the next would take a chunk's cost past `max_cost` (0: never)."""
        chunks: list[list[tuple[J, asyncio.Future[R]]]] = [[]]
        total = 0
        for item in items:
            c = self.cost(item[0])
            if chunks[-1] and self.max_cost and total + c > self.max_cost:
                chunks.append([])
                total = 0
            chunks[-1].append(item)
            total += c
        return chunks

    async def _run(self, items: list[tuple[J, asyncio.Future[R]]]) -> None:
        live = [(j, f) for j, f in items if not f.done()]  # a client that went away cancels its future
        if not live:
            return
        futures = [f for _, f in live]

        def wanted() -> list[bool]:  # a cancelled future is done at once, whichever thread asks
            return [not f.done() for f in futures]

        run = asyncio.ensure_future(self.run([j for j, _ in live], wanted))
        try:
            while not run.done():
                waiting = [f for _, f in live if not f.done()]
                if not waiting:  # every client went away: a call not yet started never starts
                    run.cancel()
                await asyncio.wait([run, *waiting], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not run.done():  # the collector itself was cancelled
                run.cancel()
        if run.cancelled():
            return
        try:
            results = run.result()
        except Exception as exc:  # every request of the failed call gets the error
            for _, f in live:
                if not f.done():
                    f.set_exception(exc)
            return
        for (_, f), r in zip(live, results):
            if not f.done():
                if r is None:  # the run dropped a row whose client was still there: a bug in `run`
                    f.set_exception(RuntimeError("the batch call returned no result for this request"))
                else:
                    f.set_result(r)


def run_wanted(jobs: list[J], wanted: Wanted | None, run: Callable[[list[J]], list[R]]) -> list[R | None]:
    """`run` over the rows of `jobs` that `wanted` still wants (all without it), results in the
    rows' order and None for each dropped row; `run` is not called when none is left."""
    keep = wanted() if wanted is not None else [True] * len(jobs)
    live = [j for j, k in zip(jobs, keep) if k]
    if not live:
        return [None] * len(jobs)
    done = iter(run(live))
    return [next(done) if k else None for k in keep]
