"""The completion engine: the base model, loaded once, completing prompts on its own `model` thread.

Concurrent greedy completions are micro-batched into one forward in which every row applies its
own LoRA (shared weights are never modified); a sampled one runs alone, so that its seed gives
the same text as alone.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..adapters import Lora
from ..basemodel import BaseModel, BaseModelError, Completed
from ..errors import UnavailableError
from .batching import MicroBatcher
from .lifecycle import Lifecycle
from .metrics import Metrics
from .settings import ApiSettings

_sampled = itertools.count()


@dataclass(eq=False)
class Completion:
    prompt: str
    lora: Lora | None
    max_tokens: int
    temperature: float
    seed: int | None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Greedy requests with the same max_tokens and stop strings share a forward; each row applies
        # its own LoRA. A sampled request runs alone, so that its seed gives the same text as alone.
        self.group: tuple[Any, ...] = (("greedy", self.max_tokens, self.stop) if self.temperature == 0
                                       else ("sampled", next(_sampled)))


def new_completion_id() -> str:
    return f"cmpl-{secrets.token_hex(12)}"


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

    def warm(self) -> None:
        self.base_model().complete(["warm up"], max_new_tokens=1)

    async def complete(self, prompt: str, lora: Lora | None, max_tokens: int, temperature: float,
                       seed: int | None, stop: tuple[str, ...] = ()) -> Completed:
        return await self.batcher.submit(Completion(prompt, lora, max_tokens, temperature, seed, stop))

    async def _run(self, jobs: list[Completion]) -> list[Completed]:
        texts = await asyncio.get_running_loop().run_in_executor(self.model_pool, self._complete, jobs)
        self.metrics.completion_batch(len(jobs))
        return texts

    def _complete(self, jobs: list[Completion]) -> list[Completed]:
        """One batched forward for `jobs` (one group: same max_tokens, greedy or one sampled job)."""
        first = jobs[0]
        loras = [j.lora for j in jobs] if any(j.lora is not None for j in jobs) else None
        return self.base_model().completions([j.prompt for j in jobs], loras=loras, max_new_tokens=first.max_tokens,
                                             temperature=first.temperature, seed=first.seed, stop=first.stop)
