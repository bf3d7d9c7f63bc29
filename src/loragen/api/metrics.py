"""Prometheus text exposition (format 0.0.4) for the few series the service keeps, no dependency."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
Labels = tuple[tuple[str, str], ...]


def _fmt(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = [*labels, *extra]
    if not items:
        return ""
    body = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in items)
    return "{" + body + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[Labels, int] = defaultdict(int)
        self.latency: dict[Labels, Histogram] = {}
        self.batch = Histogram(BATCH_BUCKETS)
        self.completion_batches = Histogram(BATCH_BUCKETS)
        self.generated = 0
        self.gauges: dict[str, float] = {}

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (("method", method), ("route", route), ("status", str(status)))
        with self._lock:
            self.requests[labels] += 1
            key = (("route", route),)
            self.latency.setdefault(key, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def generation_batch(self, size: int) -> None:
        with self._lock:
            self.batch.observe(size)
            self.generated += size

    def completion_batch(self, size: int) -> None:
        with self._lock:
            self.completion_batches.observe(size)

    def render(self, cache_hits: int, cache_misses: int, cache_bytes: int, cache_items: int) -> str:
        out: list[str] = []
        with self._lock:
            out += ["# HELP loragen_requests_total HTTP requests by route and status.",
                    "# TYPE loragen_requests_total counter"]
            out += [f"loragen_requests_total{_fmt(k)} {v}" for k, v in sorted(self.requests.items())]
            out += ["# HELP loragen_request_seconds HTTP request latency.",
                    "# TYPE loragen_request_seconds histogram"]
            for k, h in sorted(self.latency.items()):
                out += self._histogram("loragen_request_seconds", k, h)
            out += ["# HELP loragen_generation_batch_size LoRAs decoded per generator call.",
                    "# TYPE loragen_generation_batch_size histogram"]
            out += self._histogram("loragen_generation_batch_size", (), self.batch)
            out += ["# HELP loragen_completion_batch_size Completions decoded per forward batch.",
                    "# TYPE loragen_completion_batch_size histogram"]
            out += self._histogram("loragen_completion_batch_size", (), self.completion_batches)
            out += ["# TYPE loragen_generated_loras_total counter", f"loragen_generated_loras_total {self.generated}"]
        out += ["# TYPE loragen_cache_hits_total counter", f"loragen_cache_hits_total {cache_hits}",
                "# TYPE loragen_cache_misses_total counter", f"loragen_cache_misses_total {cache_misses}",
                "# TYPE loragen_cache_bytes gauge", f"loragen_cache_bytes {cache_bytes}",
                "# TYPE loragen_cache_items gauge", f"loragen_cache_items {cache_items}"]
        return "\n".join(out) + "\n"

    @staticmethod
    def _histogram(name: str, labels: Labels, h: Histogram) -> list[str]:
        lines = [f"{name}_bucket{_fmt(labels, (('le', repr(float(b))),))} {c}" for b, c in zip(h.buckets, h.counts)]
        lines.append(f"{name}_bucket{_fmt(labels, (('le', '+Inf'),))} {h.count}")
        lines.append(f"{name}_sum{_fmt(labels)} {h.sum}")
        lines.append(f"{name}_count{_fmt(labels)} {h.count}")
        return lines
