"""The service's Prometheus series, exposed in the text format 0.0.4 by `prometheus_client`.

Series (names, types and labels are part of the service's interface):

- `loragen_requests_total{method, route, status}` counter: HTTP requests (status 499: the client
  left before an answer);
- `loragen_request_seconds{route}` histogram: HTTP request latency;
- `loragen_generation_batch_size` histogram: LoRAs decoded per generator call;
- `loragen_completion_batch_size` histogram: completions decoded per forward batch;
- `loragen_generated_loras_total` counter;
- `loragen_cache_hits_total`, `loragen_cache_misses_total` counters and `loragen_cache_bytes`,
  `loragen_cache_items` gauges: the LoRA cache, read when scraped;
- `loragen_queue_depth{engine}` and `loragen_active_requests{engine}` gauges: requests waiting for,
  and holding, a slot of an engine (`generation`, `completion`), read when scraped;
- `loragen_queue_wait_seconds{engine}` histogram: time from admission to a slot;
- `loragen_refused_requests_total{reason}` counter: requests refused before any work (queue_full,
  not_ready, rate_limited, cost_limit, memory_budget);
- `loragen_cancelled_requests_total{reason}` counter: requests dropped when their client
  disconnected or their deadline passed;
- `loragen_queue_dropped_total{engine}` counter: queued requests that left before reaching the engine.

Each `Metrics` owns its own `CollectorRegistry`, so several apps in one process never share or
clash over series. The `_created` samples `prometheus_client` adds are left out of the text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .cache import ByteLRU

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _CacheCollector(Collector):
    """The cache's counters and sizes, read from the cache at each scrape."""

    def __init__(self, cache: ByteLRU[Any, Any]) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        c = self.cache
        yield CounterMetricFamily("loragen_cache_hits", "LoRA cache lookups that found the LoRA.", value=c.hits)
        yield CounterMetricFamily("loragen_cache_misses", "LoRA cache lookups that did not.", value=c.misses)
        yield GaugeMetricFamily("loragen_cache_bytes", "Bytes of LoRAs held in the cache.", value=c.size)
        yield GaugeMetricFamily("loragen_cache_items", "LoRAs held in the cache.", value=len(c))


class _WithoutCreated:
    """A registry's families without their `_created` samples, for `generate_latest`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if s.name != family.name + "_created"]
            yield family


class Metrics:
    """The service's series in a registry of their own; `render()` is the `/metrics` body."""

    def __init__(self, cache: ByteLRU[Any, Any] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("loragen_requests", "HTTP requests by route and status.",
                                 ["method", "route", "status"], registry=self.registry)
        self._latency = Histogram("loragen_request_seconds", "HTTP request latency.", ["route"],
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self._batch = Histogram("loragen_generation_batch_size", "LoRAs decoded per generator call.",
                                buckets=BATCH_BUCKETS, registry=self.registry)
        self._completion_batches = Histogram("loragen_completion_batch_size",
                                             "Completions decoded per forward batch.",
                                             buckets=BATCH_BUCKETS, registry=self.registry)
        self._generated = Counter("loragen_generated_loras", "LoRAs generated.", registry=self.registry)
        self._depth = Gauge("loragen_queue_depth", "Requests waiting for an engine slot.", ["engine"],
                            registry=self.registry)
        self._active = Gauge("loragen_active_requests", "Requests holding an engine slot.", ["engine"],
                             registry=self.registry)
        self._wait = Histogram("loragen_queue_wait_seconds", "Time from admission to an engine slot.", ["engine"],
                               buckets=LATENCY_BUCKETS, registry=self.registry)
        self._refused = Counter("loragen_refused_requests", "Requests refused before any work, by reason.",
                                ["reason"], registry=self.registry)
        self._cancelled = Counter("loragen_cancelled_requests", "Requests dropped when their client disconnected "
                                  "or their deadline passed.", ["reason"], registry=self.registry)
        self._dropped = Counter("loragen_queue_dropped", "Queued requests that left before reaching the engine.",
                                ["engine"], registry=self.registry)
        if cache is not None:
            self.registry.register(_CacheCollector(cache))
        self._exposed = _WithoutCreated(self.registry)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._requests.labels(method=method, route=route, status=str(status)).inc()
        self._latency.labels(route=route).observe(seconds)

    def generation_batch(self, size: int) -> None:
        self._batch.observe(size)
        self._generated.inc(size)

    def completion_batch(self, size: int) -> None:
        self._completion_batches.observe(size)

    def queue_state(self, engine: str, depth: Callable[[], float], active: Callable[[], float]) -> None:
        self._depth.labels(engine=engine).set_function(depth)
        self._active.labels(engine=engine).set_function(active)

    def queue_wait(self, engine: str, seconds: float) -> None:
        self._wait.labels(engine=engine).observe(seconds)

    def refused(self, reason: str) -> None:
        self._refused.labels(reason=reason).inc()

    def cancelled(self, reason: str) -> None:
        self._cancelled.labels(reason=reason).inc()

    def dropped(self, engine: str) -> None:
        self._dropped.labels(engine=engine).inc()

    def render(self) -> str:
        """Every series in the Prometheus text format 0.0.4."""
        return generate_latest(self._exposed).decode()  # type: ignore[arg-type]
