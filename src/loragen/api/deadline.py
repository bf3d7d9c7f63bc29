"""Deadlines and cancellation: a request is dropped when its client leaves or its deadline passes.

`Deadline` runs each HTTP request's handler as a task of its own and cancels it when the client
disconnects, or when `timeout_s` passes before the response has started (the client then gets 504).
Cancelling the handler cancels what it awaits: its place in an admission queue, its micro-batcher
future (the batcher skips requests whose future is done, so queued work never reaches the engine)
and an engine call not yet started. It sits inside `BodyLimit`, which has read the whole body, so
every later `receive` is free to watch for the disconnect, as vLLM aborts requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response
from .metrics import Metrics


class Deadline:
    def __init__(self, app: ASGIApp, timeout_s: float, metrics: Metrics) -> None:
        self.app, self.timeout_s, self.metrics = app, timeout_s, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body: list[Message] = []
        while not body or body[-1].get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.append(message)
        gone = asyncio.Event()
        started = False

        async def replay() -> Message:
            if body:
                return body.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send_started(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        handler = asyncio.ensure_future(self.app(scope, replay, send_started))
        watcher = asyncio.ensure_future(watch())
        try:
            await self._run(handler, watcher, lambda: started, scope, receive, send)
        finally:
            for task in (handler, watcher):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher

    async def _run(self, handler: asyncio.Future[None], watcher: asyncio.Future[None], started: Callable[[], bool],
                   scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            timeout = None if started() else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait({handler, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if handler in done:
                handler.result()  # re-raise what the handler raised
                return
            if watcher in done:  # the client left: drop its work
                self.metrics.cancelled("disconnect")
                await _cancelled(handler)
                return
            if not started():
                self.metrics.cancelled("deadline")
                await _cancelled(handler)
                if not started():
                    response = error_response(504, "deadline_exceeded", f"the request did not finish within its "
                                              f"deadline of {self.timeout_s:g} s (request_timeout_s); its work "
                                              "was dropped")
                    await response(scope, receive, send)
                return


async def _cancelled(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
