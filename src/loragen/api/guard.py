"""What stands between a request and the engines: admission queues, cost limits and per-key rate limits.

One `Guard` per app. Its `generation` and `completion` admissions bound the two engines (the
generation thread and the completion thread); `limits()` gives the cost limits of the registry and
base model loaded now; `rate` holds the per-key buckets. Routes check limits first, then wait for
a slot, so a request that can never run does not take a place in a queue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from fastapi import Request

from .admission import Admission
from .limits import Limits
from .ratelimit import RateLimiter

if TYPE_CHECKING:
    from .service import Service


class Guard:
    def __init__(self, service: Service) -> None:
        settings = service.settings
        self.service = service
        loading = service.readiness

        def ready() -> bool:  # refuse while a component is still loading; one that failed says so itself
            return not any(s in ("waiting", "loading") for s in loading.state.values())

        self.generation = Admission("generation", settings.max_concurrent_requests, settings.max_queued_requests,
                                    service.metrics, ready)
        self.completion = Admission("completion", settings.max_concurrent_requests, settings.max_queued_requests,
                                    service.metrics, ready)
        self.rate = RateLimiter(settings, service.metrics)
        self._limits: Limits | None = None

    def limits(self) -> Limits:
        self.generation.check_ready()
        spec, base = self.service.reg.spec, self.service.completions._base
        if self._limits is None or self._limits.spec != spec or self._limits.base is not base:
            self._limits = Limits(self.service.settings, spec, base)  # keeps its tokenizer copy until they change
        return self._limits

    def generated(self, request: Request, nbytes: int) -> None:
        """Counts `nbytes` of generated weights against the request's API key, if it gave one."""
        self.rate.generated(getattr(request.state, "api_key", None), nbytes)

    def slot(self, admission: Admission) -> Callable[[], AsyncIterator[None]]:
        """A route dependency that holds a slot of `admission` while the route runs."""

        async def hold() -> AsyncIterator[None]:
            async with admission.slot():
                yield

        return hold
