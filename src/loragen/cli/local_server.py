"""A `loragen serve` subprocess on a free loopback port, for benchmarks: started, awaited, stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from ..errors import LoragenError


class ServerStartError(LoragenError, RuntimeError):
    """The benchmark's own server did not become ready."""


@dataclass
class LocalServer:
    url: str
    process: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (every thread)."""
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_server(*, max_batch: int | None = None, max_wait_ms: float | None = None, registry: Path | None = None,
                 encoder_dtype: str | None = None, encoder_workers: int | None = None,
                 startup_s: float = 900.0) -> Iterator[LocalServer]:
    """`loragen serve` with these settings (else its defaults: the demo world), ready when yielded."""
    port = free_port()
    command = [sys.executable, "-m", "loragen.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning"]
    if max_batch is not None:
        command += ["--max-batch", str(max_batch)]
    if max_wait_ms is not None:
        command += ["--max-wait-ms", str(max_wait_ms)]
    if registry is not None:
        command += ["--registry", str(registry)]
    if encoder_dtype is not None:
        command += ["--encoder-dtype", encoder_dtype]
    if encoder_workers is not None:
        command += ["--encoder-workers", str(encoder_workers)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        server = LocalServer(f"http://127.0.0.1:{port}", process)
        try:
            _wait_ready(server, startup_s, log)
            yield server
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on SIGINT
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _wait_ready(server: LocalServer, timeout_s: float, log: IO[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerStartError(f"the server exited with code {server.process.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerStartError(f"the server was not ready after {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: IO[bytes], size: int = 4000) -> str:
    end = log.seek(0, os.SEEK_END)
    log.seek(max(0, end - size))
    return log.read().decode("utf-8", "replace")
