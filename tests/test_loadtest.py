"""`loragen bench serve` against a real server: every case and level is measured, and the report adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from test_api import server  # noqa: F401 (the tiny world's uvicorn server)

from loragen.bench.loadtest import cases, parse_levels

SRC = Path(__file__).resolve().parents[1] / "src"


def test_bench_serve_reports_every_case_and_level(server: str, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "loragen.cli", "bench", "serve", "--url", server,
                          "--concurrency", "1,4", "--seconds", "0.5", "--warmup", "0.1", "--max-tokens", "2",
                          "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["servers"] == [{"label": "batched", "url": server, "max_batch": 32, "max_wait_ms": 5.0,
                                  "encoder_dtype": "float32", "encoder_workers": 2}]
    rows = {(r["case"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {(c, n) for c in ("loras-json", "loras-zip", "completions") for n in (1, 4)}
    for r in rows.values():
        assert r["requests"] > 0 and r["errors"] == 0, r
        assert r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] and r["req_per_s"] > 0
        assert r["cache_hit_fraction"] == 0.0  # every description is new
        assert 0 < r["client_cpu"]
    assert rows[("loras-json", 4)]["mean_batch"] >= 1
    assert "loras-json" in run.stdout and "completions" in run.stdout


def test_bench_serve_loads_a_learned_method_and_rejects_an_unknown_one(server: str) -> None:  # noqa: F811
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "loragen.cli", "bench", "serve", "--url", server, "--cases", "loras-json",
            "--concurrency", "2", "--seconds", "0.3", "--warmup", "0"]
    run = subprocess.run([*base, "--method", "sg"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "0 errors" in run.stderr and "req/s" in run.stdout  # a 4xx for the method would count as errors
    bad = subprocess.run([*base, "--method", "magic"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "unknown method 'magic'" in bad.stderr
    body = cases("t", method="icm")
    assert body["loras-json"].body(0)["method"] == "icm" and body["completions"].body(0)["method"] == "icm"
    assert "method" not in cases("t")["loras-json"].body(0)


def test_descriptions_are_unique_and_levels_parse() -> None:
    table = cases("t1")
    bodies = [table["loras-json"].body(i)["description"] for i in range(1000)]
    assert len(set(bodies)) == 1000 and table["loras-zip"].headers["accept"] == "application/zip"
    assert cases("t2")["loras-json"].body(0) != table["loras-json"].body(0)
    assert parse_levels("1, 8,32") == [1, 8, 32]
    for bad in ("", "0", "a,b", "-1"):
        try:
            parse_levels(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_readyz_tells_the_bench_its_settings(server: str) -> None:  # noqa: F811
    body = httpx.get(f"{server}/readyz").json()
    assert body["max_batch"] == 32 and body["encoder_dtype"] == "float32" and body["encoder_workers"] == 2


def test_a_kept_alive_connection_the_server_closed_is_reopened_once() -> None:
    """A server that closes each connection after one answer (as uvicorn does past its keep-alive
    timeout, say while the client waits a Retry-After): the next request goes out on a new one."""
    import asyncio

    from loragen.bench.loadtest import Connection

    async def run() -> tuple[list[int], int]:
        opened = 0

        async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal opened
            opened += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(h for h in head.decode().split("\r\n") if h.lower().startswith("content-length"))
                         .split(":")[1])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()  # without "connection: close": the client learns on its next request

        srv = await asyncio.start_server(answer_once, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        conn = Connection(f"http://127.0.0.1:{port}")
        statuses = []
        for _ in range(3):
            statuses.append((await conn.post("/x", {"a": 1}, {}))[0])
            await asyncio.sleep(0.05)
        await conn.close()
        srv.close()
        return statuses, opened

    statuses, opened = asyncio.run(run())
    assert statuses == [200, 200, 200] and opened == 3
