"""A bounded closed-loop load on a loragen server: N concurrent clients, one httpx connection pool.

Each client sends its next request as soon as the previous one is answered, until the time is up.
Each client holds one keep-alive HTTP/1.1 connection written on asyncio streams (`Connection`):
the load generator shares the server's cores on loopback, and httpx's CPU per request adds up to
a good part of a core at the rates measured, which the server then would not have. The side calls
(`/metrics`) still go through httpx.
Every request carries a description no other request of the run uses, so the server's LoRA cache
cannot answer it; the cache hits the server counted during a level (from `/metrics`) are reported
so that this can be checked. Latency is measured from just before the request is sent to the end
of the response body. A request the server refuses for load (429, or 503 while it starts) counts as
refused, not as an error or in the latencies, and its client waits the `Retry-After` it was given
(up to the end of the level), as a well-behaved client does.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import secrets
import time
from urllib.parse import urlencode, urlsplit
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel

from ..demo import sets

# Phrasings of the demo world's kind of task; a per-request suffix makes every description unique.
PHRASES = sets.texts("load_phrases")
PROMPTS = ("abcde", "hello", "string", "loragen", "qwerty", "python")
CASE_NAMES = ("loras-json", "loras-zip", "completions")
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Case:
    """One kind of request: `body(i)` is the JSON body of the run's i-th request."""

    name: str
    path: str
    body: Callable[[int], dict[str, Any]]
    headers: dict[str, str]
    params: dict[str, str] | None = None


def cases(tag: str, max_tokens: int = 8, method: str | None = None) -> dict[str, Case]:
    """The benchmarked requests; `tag` keeps descriptions of different runs apart; `method` (else
    the server's default) generates them."""

    def described(i: int, **body: Any) -> dict[str, Any]:
        body["description"] = f"{PHRASES[i % len(PHRASES)]} (request {tag}-{i})"
        return body if method is None else {**body, "method": method}

    json_accept = {"accept": "application/json"}
    return {
        "loras-json": Case("loras-json", "/v1/loras", lambda i: described(i), json_accept),
        "loras-zip": Case("loras-zip", "/v1/loras", lambda i: described(i), {"accept": "application/zip"}),
        "completions": Case("completions", "/v1/completions",
                            lambda i: described(i, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens),
                            json_accept),
    }


class Connection:
    """One keep-alive HTTP/1.1 connection: POST a JSON body, read the status and the whole body."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.headers: dict[str, str] = {}  # the last response's, names in lower case
        self._answered = False  # whether the current request's status line has arrived

    async def post(self, path: str, body: dict[str, Any], headers: dict[str, str],
                   params: dict[str, str] | None = None) -> tuple[int, bytes]:
        """The response's status and body. A kept-alive connection the server has since closed (its
        keep-alive timeout passed while this client waited, e.g. a `Retry-After`) fails before any
        byte of an answer: the request is sent once more on a new connection, as HTTP clients do."""
        reused = self._streams is not None
        try:
            return await self._post(path, body, headers, params)
        except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
            if not reused or self._answered or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise
            return await self._post(path, body, headers, params)

    async def _post(self, path: str, body: dict[str, Any], headers: dict[str, str],
                    params: dict[str, str] | None) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        data = json.dumps(body).encode()
        target = self.prefix + path + (f"?{urlencode(params)}" if params else "")
        head = [f"POST {target} HTTP/1.1", f"host: {self.host}:{self.port}", "content-type: application/json",
                f"content-length: {len(data)}", *(f"{k}: {v}" for k, v in headers.items())]
        self._answered = False
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            self._answered = True
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
            self.headers = fields
            if fields.get("transfer-encoding", "").lower() == "chunked":
                payload = await self._chunked(reader)
            else:
                payload = await reader.readexactly(int(fields.get("content-length", "0")))
            if fields.get("connection", "").lower() == "close":
                await self.close()
            return int(status_line.split()[1]), payload
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            await self.close()
            raise

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # the empty trailer
        return b"".join(parts)

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


class LevelResult(BaseModel):
    case: str
    concurrency: int
    seconds: float
    requests: int
    errors: int
    refused: int = 0  # answered 429 (or 503) with Retry-After: refused for load, not failed
    error_samples: list[str]
    req_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    cache_hit_fraction: float | None  # server-side cache lookups that hit during the level
    mean_batch: float | None  # LoRAs per generator call during the level (server metrics)
    client_cpu: float  # the load generator's CPU seconds per wall second (1.0 = one core)
    server_cpu: float | None  # the same for the server process, when it is known


def _counters(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


async def server_counters(http: httpx.AsyncClient) -> dict[str, float]:
    try:
        response = await http.get("/metrics")
    except httpx.HTTPError:
        return {}
    return _counters(response.text) if response.is_success else {}


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float | None:
    if name not in after:
        return None
    return after[name] - before.get(name, 0.0)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


async def run_level(http: httpx.AsyncClient, case: Case, concurrency: int, seconds: float, *,
                    start_index: int = 0, server_cpu: Callable[[], float] | None = None) -> LevelResult:
    """`concurrency` clients send `case` requests back to back for `seconds`."""
    latencies: list[float] = []
    errors: list[str] = []
    refused = 0
    counter = iter(range(start_index, 2**62))
    loop = asyncio.get_running_loop()

    async def worker(deadline: float) -> None:
        nonlocal refused
        connection = Connection(str(http.base_url))
        try:
            while loop.time() < deadline:
                i = next(counter)
                started = time.perf_counter()
                try:
                    status, payload = await asyncio.wait_for(
                        connection.post(case.path, case.body(i), case.headers, case.params), REQUEST_TIMEOUT_S)
                    retry_after = connection.headers.get("retry-after", "")
                    if status in (429, 503) and retry_after.isdigit():
                        refused += 1
                        await asyncio.sleep(max(0.0, min(float(retry_after), deadline - loop.time())))
                        continue
                    if status >= 400:
                        errors.append(f"{status} {payload[:200].decode('utf-8', 'replace')}")
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError,
                        asyncio.TimeoutError) as exc:
                    await connection.close()
                    errors.append(f"{type(exc).__name__}: {exc}")
                latencies.append(time.perf_counter() - started)
        finally:
            await connection.close()

    before = await server_counters(http)
    cpu0, server0, wall0 = time.process_time(), server_cpu() if server_cpu else None, time.perf_counter()
    deadline = loop.time() + seconds
    await asyncio.gather(*(worker(deadline) for _ in range(concurrency)))
    wall = time.perf_counter() - wall0
    cpu, server = time.process_time() - cpu0, server_cpu() - server0 if server_cpu and server0 is not None else None
    after = await server_counters(http)

    hits = _delta(after, before, "loragen_cache_hits_total")
    misses = _delta(after, before, "loragen_cache_misses_total")
    lookups = None if hits is None or misses is None else hits + misses
    ms = np.asarray(latencies) * 1e3
    stat = (lambda f: round(float(f(ms)), 2)) if len(ms) else (lambda f: None)
    return LevelResult(
        case=case.name, concurrency=concurrency, seconds=round(wall, 3), requests=len(latencies),
        errors=len(errors), refused=refused, error_samples=sorted(set(errors))[:5], req_per_s=round(len(latencies) / wall, 2),
        p50_ms=stat(lambda a: np.percentile(a, 50)), p99_ms=stat(lambda a: np.percentile(a, 99)),
        mean_ms=stat(np.mean), max_ms=stat(np.max),
        cache_hit_fraction=_ratio(hits, lookups),
        mean_batch=_ratio(_delta(after, before, "loragen_generation_batch_size_sum"),
                          _delta(after, before, "loragen_generation_batch_size_count")),
        client_cpu=round(cpu / wall, 3), server_cpu=round(server / wall, 3) if server is not None else None)


async def bench_server(url: str, *, concurrency: list[int], seconds: float, case_names: list[str],
                       warmup_s: float = 1.0, max_tokens: int = 8, server_cpu: Callable[[], float] | None = None,
                       method: str | None = None, log: Callable[[str], None] = lambda _: None) -> list[LevelResult]:
    """Every case at every concurrency level against one server, each level after a short warm-up."""
    # This process holds torch (through loragen.adapters); a full collection of its objects would
    # stall the clients for a few hundred ms and show up as server latency.
    gc.collect()
    gc.freeze()
    tag = secrets.token_hex(4)
    table = cases(tag, max_tokens, method)
    unknown = [n for n in case_names if n not in table]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    results = []
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=60.0) as http:
        index = 0
        for name in case_names:
            for n in concurrency:
                if warmup_s > 0:
                    await run_level(http, table[name], n, warmup_s, start_index=index)
                    index += 1_000_000
                result = await run_level(http, table[name], n, seconds, start_index=index,
                                         server_cpu=server_cpu)
                index += 1_000_000
                log(f"{url} {name} c={n}: {result.req_per_s} req/s, p50 {result.p50_ms} ms, "
                    f"p99 {result.p99_ms} ms, {result.errors} errors, {result.refused} refused")
                results.append(result)
    return results


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise ValueError(f"concurrency must be comma-separated integers, not {text!r}") from None
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"concurrency levels must be positive, not {text!r}")
    return levels


def machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}
