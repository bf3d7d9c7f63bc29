"""The service's life-cycle: open the registry, warm every component in order, say when ready, stop.

SQLite connections belong to the thread that opened them, so the registry is opened, and every
registry or generator call runs, on one `engine` thread. Serving starts at once; loading and
warming go on in the background, and `/readyz` names what is not ready yet.

With no registry named, the service serves the demo world, building its experts first if need be.
Where the world's second stage (the multi-task LoRA and the learned generators) is missing, it is
built in a child process after the warm-up: the retrieval methods answer meanwhile, and the
methods it adds answer 503 with `Retry-After` until it is done and loaded (`demo_world` in /readyz).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..demo.background import PENDING_METHODS, BackgroundBuild
from ..embeddings import TextEncoder, resolve_dtype
from ..errors import NotReadyError
from ..registry import Registry
from .readiness import Readiness
from .settings import ApiSettings

T = TypeVar("T")
log = logging.getLogger(__name__)
# How long a client is told to wait for a method that the demo world's second stage adds.
BUILD_RETRY_AFTER_S = 30


class Runs(Protocol):
    """A background worker the life-cycle starts and stops (the micro-batchers, the completion engine)."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class WarmStep:
    """One component's loading: `run` on `pool`, reported to readiness under `component`."""

    component: str
    pool: Executor
    run: Callable[[], None]


class Lifecycle:
    """Owns the engine thread and the registry; runs the warm-up steps after opening it."""

    def __init__(self, settings: ApiSettings, encoder: TextEncoder | None = None) -> None:
        self.settings = settings
        self._encoder = encoder
        self.engine = ThreadPoolExecutor(1, thread_name_prefix="loragen-engine")
        self.registry: Registry | None = None
        self.generator_root: Path | None = settings.generator
        self.readiness = Readiness()
        self._warming: asyncio.Task[None] | None = None
        self._workers: list[Runs] = []
        self._stopping = False
        self.world_build: BackgroundBuild | None = None
        self._builds = ThreadPoolExecutor(1, thread_name_prefix="loragen-demo-build")  # waits on the child
        self._on_world_built: Callable[[], None] = lambda: None

    async def start(self, workers: list[Runs], steps: list[WarmStep],
                    on_world_built: Callable[[], None] | None = None) -> None:
        """Start `workers` now; open the registry, warm the encoder, then run `steps`, in the background.
        `on_world_built` runs on the engine thread once a background build of the demo world is done."""
        self._workers = workers
        self._on_world_built = on_world_built or self._on_world_built
        for w in workers:
            w.start()
        self._warming = asyncio.get_running_loop().create_task(self._warm(steps))

    async def stop(self) -> None:
        self._stopping = True
        if self._warming is not None:
            self._warming.cancel()
        if self.world_build is not None:
            self.world_build.stop()
        self._builds.shutdown(wait=False)
        for w in self._workers:
            await w.stop()
        if self.registry is not None:
            await self.in_engine(self.registry.close)
        self.engine.shutdown(wait=False)

    @property
    def ready(self) -> bool:
        return self.readiness.ready and not self._stopping

    @property
    def reg(self) -> Registry:
        if self.registry is None:
            raise NotReadyError("the service is still starting")
        return self.registry

    def check_serves(self, method: str) -> None:
        """Raise NotReadyError for a method the demo world's background build has yet to add."""
        state = self.readiness.state.get("demo_world")
        if state is None or state == "ready" or state.startswith("failed") or method not in PENDING_METHODS:
            return
        raise NotReadyError(f"method {method!r} is not ready yet: the demo world's multi-task LoRA and learned "
                            f"generators are still training ({state}; see /readyz); nearest and weighted answer now",
                            retry_after=BUILD_RETRY_AFTER_S)

    async def in_engine(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the engine thread. A call still queued when its caller is
        cancelled never runs: the engine checks the caller's future as it starts the call, because
        asyncio passes the cancellation on to the executor's queue only a loop turn later."""
        waiting: list[asyncio.Future[T]] = []

        def call() -> T:
            if waiting and waiting[0].cancelled():
                raise asyncio.CancelledError
            return fn(*args, **kwargs)

        future = asyncio.get_running_loop().run_in_executor(self.engine, call)
        waiting.append(future)
        return await future

    async def _warm(self, steps: list[WarmStep]) -> None:
        loop = asyncio.get_running_loop()
        own = [WarmStep("registry", self.engine, self._open), WarmStep("encoder", self.engine, self._warm_encoder)]
        for step in own + steps + [WarmStep("demo_world", self._builds, self._finish_world)]:
            if step.component not in self.readiness.state:
                continue  # the demo world is built, or not served
            self.readiness.loading(step.component)
            try:
                await loop.run_in_executor(step.pool, step.run)
            except Exception as exc:  # the service stays up and /readyz says what failed
                log.error("%s failed to load: %s", step.component, exc)
                self.readiness.failed(step.component, exc)
                if step.component == "registry":
                    return  # nothing else can load without it
                continue
            self.readiness.done(step.component)
        # Torch, transformers and the models are hundreds of thousands of long-lived objects; a full
        # collection walks them all, stalling every request meanwhile. Freezing them keeps the
        # collector to what requests allocate.
        gc.collect()
        gc.freeze()

    def _open(self) -> None:
        path = self.settings.registry
        if path is None:
            from ..demo.world import build_demo_experts

            world = build_demo_experts(self.settings.home, encoder=self._encoder)
            path, self.generator_root = world.registry, self.generator_root or world.generators
            if not world.is_built():
                self.readiness.waiting("demo_world")
        registry = Registry.open(path, encoder=self._encoder, device=self.settings.device,
                                 read_only=self.settings.registry_read_only)
        dtype = resolve_dtype(self.settings.encoder_dtype, registry.encoder.device)
        registry.encoder = registry.encoder.with_options(compute_dtype=dtype, workers=self.settings.encoder_workers)
        self.registry = registry

    def _warm_encoder(self) -> None:
        # Enough texts to be split, so the encoder's workers start now rather than on a request.
        encoder = self.reg.encoder
        encoder.encode(["warm up"] * 2 * encoder.workers)

    def _finish_world(self) -> None:
        """Build the demo world's second stage in a child process, then load what it added."""
        self.readiness.loading("demo_world", "training the multi-task LoRA and the icm and sg generators")
        self.world_build = BackgroundBuild(self.settings.home)
        if self._stopping:
            self.world_build.stop()
        self.world_build.start()
        self.world_build.wait()
        self.readiness.loading("demo_world", "loading the generators")
        self.engine.submit(self._on_world_built).result()
