"""Holding under abuse and overload, on a real uvicorn server: cost limits refuse costly requests at
once, a bounded queue refuses the excess with 429 + Retry-After, a client that leaves has its work
dropped before it reaches the engine, deadlines give 504, per-key rate limits give 429, and /metrics
shows the queue."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import uvicorn_server

from loragen.api import ApiSettings, create_app
from loragen.api.limits import lora_bytes
from loragen.embeddings import TextEncoder

KEY = "limits-key"
# The server's resident memory may grow by at most this much while it refuses abusive requests
# (the process that refused them used 22.5 GB before cost limits).
RSS_GROWTH_BOUND = 300 * 2**20


def rss() -> int:
    """This process's resident set (the server runs in it, on a thread)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def settings(world: Path, **overrides: object) -> ApiSettings:
    return ApiSettings(registry=world / "registry", generator=world / "generators", home=world / "home",
                       max_wait_ms=1, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def busy(world: Path, encoder: TextEncoder) -> Iterator[tuple[str, object]]:
    """A server with a small queue (2 running, 4 waiting) and a 5 s deadline; yields (url, app)."""
    app = create_app(settings(world, max_concurrent_requests=2, max_queued_requests=4, request_timeout_s=5),
                     encoder=encoder)
    with uvicorn_server(app) as url:
        yield url, app


def block_engine(app: object) -> threading.Event:
    """Holds the generation engine's one thread until the returned event is set."""
    gate = threading.Event()
    app.state.service.engine.submit(gate.wait)  # type: ignore[attr-defined]
    return gate


def metric(url: str, name: str, key: str | None = None) -> float:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    total = 0.0
    for line in httpx.get(f"{url}/metrics", headers=headers).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def generated_descriptions(app: object) -> set[str]:
    return {s.info["description"] for _, s in app.state.service.served_loras()}  # type: ignore[attr-defined]


def wait_for(condition, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_abusive_examples_and_batch_are_refused_at_once_while_healthz_answers(world: Path,
                                                                             encoder: TextEncoder) -> None:
    """The 64 x 4,000-character examples request and a 256 x 4,000 batch, under the default limits."""
    examples = [{"input": "a" * 4000, "output": "b" * 4000}] * 64
    batch = {"descriptions": [f"{i} " + "x" * 3990 for i in range(256)]}
    with uvicorn_server(create_app(settings(world), encoder=encoder)) as url, ThreadPoolExecutor(5) as pool:
        before = rss()
        started = time.monotonic()
        big = pool.submit(httpx.post, f"{url}/v1/loras", json={"description": "reverse", "examples": examples},
                          timeout=30)
        wide = pool.submit(httpx.post, f"{url}/v1/loras/batch", json=batch, timeout=30)
        fine = pool.submit(httpx.post, f"{url}/v1/loras", timeout=30, json={
            "description": "reverse the word", "examples": [{"input": "garden", "output": "nedrag"}] * 8})
        health = pool.submit(_ping, f"{url}/healthz", lambda: big.done() and wide.done() and fine.done())
        for r, limit in ((big.result(), "max_example_chars"), (wide.result(), "max_batch_chars")):
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["code"] == "limit_exceeded" and limit in err["message"], err
        assert time.monotonic() - started < 5
        assert fine.result().status_code == 200, fine.result().text
        assert fine.result().json()["examples_used"] is True
        statuses, slowest = health.result()
        assert statuses == {200} and slowest < 1.0
        assert rss() - before < RSS_GROWTH_BOUND
        assert metric(url, 'loragen_refused_requests_total{reason="cost_limit"}') == 2


def _ping(url: str, done) -> tuple[set[int], float]:  # type: ignore[no-untyped-def]
    """GETs `url` every 50 ms until `done()`; the statuses seen and the slowest answer's seconds."""
    statuses, slowest = set(), 0.0
    with httpx.Client(timeout=10) as http:
        while not done() or not statuses:
            started = time.monotonic()
            statuses.add(http.get(url).status_code)
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
    return statuses, slowest


def test_examples_and_prompts_must_fit_the_base_model_s_context(busy: tuple[str, object]) -> None:
    url, _ = busy
    r = httpx.post(f"{url}/v1/loras", json={"description": "reverse", "examples": [
        {"input": "a" * 100, "output": "b" * 100}]}, timeout=30)
    assert r.status_code == 422 and "context of 128" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "a" * 100, "max_tokens": 64}, timeout=30)
    assert r.status_code == 422 and "context of 128" in r.json()["error"]["message"], r.text
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "a" * 20, "max_tokens": 4}, timeout=30).status_code == 200


def test_a_flood_gets_429_past_the_queue_and_every_accepted_request_completes(busy: tuple[str, object]) -> None:
    url, app = busy
    gate = block_engine(app)
    refused_before = metric(url, 'loragen_refused_requests_total{reason="queue_full"}')
    descriptions = [f"flood request number {i}" for i in range(40)]
    with ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(httpx.post, f"{url}/v1/loras", json={"description": d}, timeout=30)
                   for d in descriptions]
        wait_for(lambda: sum(f.done() for f in futures) >= 34)  # 2 running + 4 queued; the rest answered
        assert metric(url, 'loragen_queue_depth{engine="generation"}') == 4
        time.sleep(0.2)
        assert sum(f.done() for f in futures) == 34
        started = time.monotonic()
        gate.set()
        answers = [f.result() for f in futures]
    assert time.monotonic() - started < 5
    refused = [r for r in answers if r.status_code == 429]
    accepted = [(d, r) for d, r in zip(descriptions, answers) if r.status_code == 200]
    assert len(refused) == 34 and len(accepted) == 6
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "overloaded"
    for d, r in accepted:
        assert r.json()["description"] == d
    assert metric(url, 'loragen_refused_requests_total{reason="queue_full"}') - refused_before == 34
    assert metric(url, 'loragen_queue_depth{engine="generation"}') == 0
    assert metric(url, 'loragen_queue_wait_seconds_count{engine="generation"}') >= 6


def _send_and_leave(url: str, description: str) -> socket.socket:
    """A POST /v1/loras sent on a raw socket, left open for the caller to close (the client leaving)."""
    host, port = url.removeprefix("http://").split(":")
    body = httpx.Request("POST", url, json={"description": description}).content
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/loras HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_a_client_leaving_mid_queue_frees_its_slot_and_its_work_never_runs(busy: tuple[str, object]) -> None:
    url, app = busy
    gate = block_engine(app)
    dropped_before = metric(url, "loragen_queue_dropped_total")
    cancelled_before = metric(url, 'loragen_cancelled_requests_total{reason="disconnect"}')
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, f"{url}/v1/loras", json={"description": "the first stays"}, timeout=30)
        wait_for(lambda: metric(url, 'loragen_active_requests{engine="generation"}') == 1)
        batched = _send_and_leave(url, "left while batched")  # holds the second slot, waits in the batcher
        wait_for(lambda: metric(url, 'loragen_active_requests{engine="generation"}') == 2)
        queued = _send_and_leave(url, "left while queued")
        wait_for(lambda: metric(url, 'loragen_queue_depth{engine="generation"}') == 1)
        queued.close()
        batched.close()
        wait_for(lambda: metric(url, 'loragen_queue_depth{engine="generation"}') == 0)
        wait_for(lambda: metric(url, 'loragen_active_requests{engine="generation"}') == 1)
        late = pool.submit(httpx.post, f"{url}/v1/loras", json={"description": "the freed slot's taker"}, timeout=30)
        wait_for(lambda: metric(url, 'loragen_active_requests{engine="generation"}') == 2)
        gate.set()
        assert first.result().status_code == 200 and late.result().status_code == 200
    made = generated_descriptions(app)
    assert {"the first stays", "the freed slot's taker"} <= made
    assert not {"left while batched", "left while queued"} & made
    assert metric(url, "loragen_queue_dropped_total") - dropped_before == 1
    assert metric(url, 'loragen_cancelled_requests_total{reason="disconnect"}') - cancelled_before == 2
    assert metric(url, 'loragen_requests_total{method="POST",route="/v1/loras",status="499"}') == 2
    assert metric(url, 'loragen_requests_total{method="POST",route="/v1/loras",status="500"}') == 0


def test_past_its_deadline_a_request_gets_504_and_its_work_is_dropped(busy: tuple[str, object]) -> None:
    url, app = busy
    gate = block_engine(app)
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/loras", json={"description": "too late to matter"}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert 5 <= time.monotonic() - started < 12  # the 5 s deadline, not the 30 s client timeout
    gate.set()
    assert httpx.post(f"{url}/v1/search", json={"description": "after"}, timeout=30).status_code == 200
    assert "too late to matter" not in generated_descriptions(app)
    assert metric(url, 'loragen_cancelled_requests_total{reason="deadline"}') >= 1


def test_not_ready_is_503_with_retry_after(world: Path, encoder: TextEncoder) -> None:
    app = create_app(settings(world), encoder=encoder)
    gate = block_engine(app)  # the registry cannot load until the gate opens
    try:
        with uvicorn_server(app, wait_ready=False) as url:
            r = httpx.post(f"{url}/v1/loras", json={"description": "early"}, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["code"] == "not_ready"
            gate.set()
    finally:
        gate.set()


def test_per_key_rate_limits_and_memory_budget(world: Path, encoder: TextEncoder) -> None:
    from loragen.registry import Registry

    reg = Registry.open(world / "registry", encoder=encoder)
    one = lora_bytes(reg.spec)
    reg.close()
    app = create_app(settings(world, api_keys=[KEY, "other-key", "scraper"], auth_all_routes=True,
                              rate_limit_rps=0.1, rate_limit_burst=4, rate_limit_bytes_per_min=int(1.5 * one),
                              memory_budget_bytes=16 * one), encoder=encoder)
    auth = {"Authorization": f"Bearer {KEY}"}
    with uvicorn_server(app) as url:  # /healthz and /readyz answer without a key
        r = httpx.post(f"{url}/v1/loras", json={"description": "a budgeted lora"}, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/v1/loras", json={"description": "one lora too many"}, headers=auth, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited", r.text
        assert "rate_limit_bytes_per_min" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
        r = httpx.post(f"{url}/v1/loras", json={"description": "many", "num_samples": 16, "method": "sg"},
                       headers=auth, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "over_memory_budget", r.text
        assert httpx.get(f"{url}/v1/experts", headers=auth).status_code == 200  # the 4th of a burst of 4
        r = httpx.get(f"{url}/v1/experts", headers=auth)
        assert r.status_code == 429 and "rate_limit_rps" in r.json()["error"]["message"], r.text
        assert 1 <= int(r.headers["retry-after"]) <= 10
        other = httpx.get(f"{url}/v1/experts", headers={"Authorization": "Bearer other-key"})
        assert other.status_code == 200  # every key has buckets of its own
        assert httpx.get(f"{url}/v1/experts").status_code == 401
        assert metric(url, 'loragen_refused_requests_total{reason="rate_limited"}', "scraper") == 2
        assert metric(url, 'loragen_refused_requests_total{reason="memory_budget"}', "scraper") == 1


def test_the_sdk_waits_out_retry_after_and_raises_rate_limit_error_past_its_retries(world: Path,
                                                                                    encoder: TextEncoder) -> None:
    import asyncio

    from loragen.client import AsyncClient, Client, RateLimitError

    app = create_app(settings(world, api_keys=[KEY, "scraper"], auth_all_routes=True, rate_limit_rps=1.0,
                              rate_limit_burst=1), encoder=encoder)
    with uvicorn_server(app) as url:
        with Client(url, KEY, retries=0) as impatient, Client(url, KEY, retries=3) as patient:
            impatient.experts.list()  # the whole burst
            with pytest.raises(RateLimitError) as refused:
                impatient.experts.list()
            assert refused.value.status == 429 and refused.value.code == "rate_limited"
            start = time.monotonic()
            assert patient.experts.list().total >= 1  # refused once, then served after its Retry-After
            assert time.monotonic() - start >= 0.5

        async def polite() -> float:
            async with AsyncClient(url, KEY, retries=3) as client:
                start = time.monotonic()
                await client.experts.list()
                await client.experts.list()
                return time.monotonic() - start

        assert asyncio.run(polite()) >= 0.5
        assert metric(url, 'loragen_refused_requests_total{reason="rate_limited"}', "scraper") >= 2


def test_a_batch_runs_in_steps_and_a_client_leaving_stops_the_rest(world: Path, encoder: TextEncoder) -> None:
    """A batch is cut into generator calls of max_batch; when its client leaves during the first,
    the engine runs no other."""
    app = create_app(settings(world, max_batch=4), encoder=encoder)
    service = app.state.service
    inside, release, steps = threading.Event(), threading.Event(), []
    generate = service._generate

    def observed(jobs, wanted=None):  # type: ignore[no-untyped-def]
        steps.append([j.description for j in jobs])
        inside.set()
        release.wait(30)  # the first step is still running when the client leaves
        return generate(jobs, wanted)

    with uvicorn_server(app) as url:
        calls = metric(url, "loragen_generation_batch_size_count")
        whole = httpx.post(f"{url}/v1/loras/batch", json={"descriptions": [f"whole batch {i}" for i in range(10)]},
                           timeout=30)
        assert whole.status_code == 200 and len(whole.json()["data"]) == 10
        assert metric(url, "loragen_generation_batch_size_count") - calls == 3  # 4 + 4 + 2
        service._generate = observed
        host, port = url.removeprefix("http://").split(":")
        body = httpx.Request("POST", url, json={"descriptions": [f"left batch {i}" for i in range(12)]}).content
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/loras/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert inside.wait(30)
        sock.close()
        wait_for(lambda: metric(url, 'loragen_cancelled_requests_total{reason="disconnect"}') == 1)
        release.set()
        assert httpx.post(f"{url}/v1/search", json={"description": "after"}, timeout=30).status_code == 200
        assert steps == [[f"left batch {i}" for i in range(4)]]
        made = generated_descriptions(app)
        assert {f"left batch {i}" for i in range(4, 12)}.isdisjoint(made)


def test_the_load_generator_counts_refusals_apart_from_errors(busy: tuple[str, object]) -> None:
    """`loragen bench serve` reports 429s as refused (waiting their Retry-After), not as errors."""
    import asyncio

    from loragen.bench.loadtest import cases, run_level

    url, app = busy
    gate = block_engine(app)
    threading.Timer(1.0, gate.set).start()  # the 2 running and 4 queued then complete

    async def level():  # type: ignore[no-untyped-def]
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            return await run_level(http, cases("refusals")["loras-json"], 10, 1.5)

    result = asyncio.run(level())
    assert result.errors == 0, result.error_samples
    assert result.refused >= 4 and result.requests >= 6
