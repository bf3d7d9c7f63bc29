"""The completion engine: the base model, loaded once, completing prompts on its own `model` thread.

Concurrent greedy completions are micro-batched into one forward in which every row applies its
own LoRA (shared weights are never modified); a sampled one runs alone, so that its seed gives
the same text as alone. Streamed rows batch as the others do: the forward hands each step's tokens
to their queues (`streaming`), and a row whose client went away is ended at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..adapters import Lora
from ..basemodel import BaseModel, BaseModelError, Completed, Prompt
from ..errors import UnavailableError
from .batching import MicroBatcher, Wanted, run_wanted
from .lifecycle import Lifecycle
from .metrics import Metrics
from .settings import ApiSettings
from .streaming import BatchStreamer, Cancelled, Event, RowStream

_sampled = itertools.count()


@dataclass(eq=False)
class Completion:
    """One row: a prompt (a raw text, or a chat's messages, which the chat template formats)."""

    prompt: Prompt
    lora: Lora | None
    max_tokens: int
    temperature: float
    seed: int | None
    stop: tuple[str, ...] = ()
    raw: bool = True
    stream: RowStream | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        # Greedy requests with the same max_tokens and stop strings share a forward; each row applies
        # its own LoRA. A sampled request runs alone, so that its seed gives the same text as alone.
        self.group: tuple[Any, ...] = (("greedy", self.max_tokens, self.stop) if self.temperature == 0
                                       else ("sampled", next(_sampled)))


def new_completion_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class CompletionEngine:
    def __init__(self, settings: ApiSettings, life: Lifecycle, metrics: Metrics) -> None:
        self.settings = settings
        self._life = life
        self.metrics = metrics
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="loragen-model")
        self.batcher: MicroBatcher[Completion, Completed] = MicroBatcher(
            self._run, lambda c: c.group, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000)
        self._base: BaseModel | None = None
        self._base_loading = threading.Lock()

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.model_pool.shutdown(wait=False)

    @property
    def loaded(self) -> bool:
        return self._base is not None

    def base_model(self) -> BaseModel:
        """Loaded once, by whichever thread asks first (the `model` thread, or the engine for examples)."""
        with self._base_loading:
            if self._base is None:
                path = self._life.reg.spec.base_model
                try:
                    self._base = BaseModel.load(path, device=self.settings.device)
                except BaseModelError as exc:
                    raise UnavailableError(f"the base model is unavailable: {exc}") from exc
            return self._base

    def check_chat(self) -> None:
        """Refuse a chat at once when the loaded base model has no chat template to format it with."""
        if self._base is not None and not getattr(self._base.tokenizer, "chat_template", None):
            raise BaseModelError("the base model's tokenizer has no chat template; send a raw prompt "
                                 "to the completions route instead")

    def warm(self) -> None:
        self.base_model().complete(["warm up"], max_new_tokens=1)

    async def complete(self, row: Completion) -> Completed:
        return await self.batcher.submit(row)

    async def stream(self, rows: list[Completion]) -> AsyncIterator[Event]:
        """The events of `rows` (a request's choices) as they are decoded: (choice, "text", piece)
        and, once per choice, (choice, "done", Completed). Closing the iterator early (the client
        went away) ends the rows at the next step, or drops them before they start."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue[Event]()
        for i, row in enumerate(rows):
            row.stream = RowStream(loop, queue, i, row.stop)
        tasks = [loop.create_task(self.batcher.submit(row)) for row in rows]
        for t in tasks:  # a failure reaches the reader as an "error" event; the task's copy is seen here
            t.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            pending = len(rows)
            while pending:
                event = await queue.get()
                if event[1] == "error":
                    raise event[2]
                pending -= event[1] == "done"
                yield event
        finally:
            for row, task in zip(rows, tasks):
                assert row.stream is not None
                row.stream.cancelled = True
                task.cancel()

    async def _run(self, jobs: list[Completion], wanted: Wanted) -> list[Completed | None]:
        try:
            texts = await asyncio.get_running_loop().run_in_executor(self.model_pool, self._complete, jobs, wanted)
        except Exception as exc:
            for j in jobs:
                if j.stream is not None:
                    j.stream.fail(exc)
            raise
        for j, done in zip(jobs, texts):
            if j.stream is not None and done is not None:
                j.stream.finish(done)
        if ran := sum(t is not None for t in texts):
            self.metrics.completion_batch(ran)
        return texts

    def _complete(self, jobs: list[Completion], wanted: Wanted) -> list[Completed | None]:
        """Runs on the model thread; rows whose client has gone by then are skipped (None)."""
        return run_wanted(jobs, wanted, self._complete_live)

    def _complete_live(self, jobs: list[Completion]) -> list[Completed]:
        first, base = jobs[0], self.base_model()
        loras = [j.lora for j in jobs] if any(j.lora is not None for j in jobs) else None
        streams = [j.stream for j in jobs]
        streamer, criteria = None, []
        if any(s is not None for s in streams):
            streamer, criteria = BatchStreamer(streams, base.tokenizer), [Cancelled(streams)]
        return base.completions([j.prompt for j in jobs], loras=loras, max_new_tokens=first.max_tokens,
                                temperature=first.temperature, seed=first.seed, stop=first.stop, top_p=first.top_p,
                                raw=[j.raw for j in jobs], streamer=streamer, criteria=criteria)
