"""Data-parallel training over local processes with torch.distributed (gloo).

On a CPU a small model keeps one thread per process busier than several threads in one process
(see `benchmarks/RESULTS.md`, demo world), so training can run as several one-thread processes,
each over its share of every step's rows. Their gradients are summed with one all_reduce per step,
so every process takes the same optimizer step and holds the same parameters. The caller is
process 0 and returns the result; the others are spawned for the job and end with it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")

# A process that waits this long for the others (to start, or in one collective) gives up: one died.
TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class Group:
    rank: int
    size: int

    def share(self, n: int) -> list[int]:
        """The indices of n work units this process runs (interleaved, so each gets a mix)."""
        return list(range(n))[self.rank :: self.size]

    def gather(self, values: list[Any]) -> list[list[Any]]:
        """Every process's `values`, by rank."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, values)
        return out

    def sum_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the processes (a missing one counts as zeros)."""
        params = list(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g)
            offset += g.numel()


def run_parallel(workers: int, job: Callable[..., T], *args: Any) -> T:
    """`job(group, *args)` in `workers` one-thread processes; returns this process's result."""
    with Team(workers, job, *args) as team:
        return team.run()


class Team:
    """`job(group, *args)` in `workers` one-thread processes, this one being process 0.

    Entering the team spawns the others; they import torch and wait for process 0, so the caller
    can use that time before `run()`, which runs process 0's part here (on one thread) and returns
    its result. Leaving waits for the others. `job` must be a module-level function and `args`
    picklable: the others are spawned, not forked, since the caller may run threads (a server)
    that a fork would not carry. With one worker, `run()` is `job(None, *args)` and nothing else."""

    def __init__(self, workers: int, job: Callable[..., T], *args: Any) -> None:
        self.workers, self.job, self.args = workers, job, args
        self._others: list[Any] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workers > 1 and dist.is_available() and dist.is_initialized():
            log.info("a torch.distributed process group is already set up here; training in this process alone")
            self.workers = 1

    def __enter__(self) -> Team:
        if self.workers > 1:
            self._tmp = tempfile.TemporaryDirectory(prefix="loragen-dp-")
            context = multiprocessing.get_context("spawn")
            self._others = [context.Process(target=_worker, daemon=True,
                                            args=(rank, self.workers, self._store, self.job, self.args))
                            for rank in range(1, self.workers)]
            for p in self._others:
                p.start()
        return self

    @property
    def _store(self) -> str:
        assert self._tmp is not None
        return str(Path(self._tmp.name) / "store")

    def run(self) -> Any:
        if self.workers <= 1:
            return self.job(None, *self.args)
        try:
            with _joined(0, self.workers, self._store), _one_thread():
                return self.job(Group(0, self.workers), *self.args)
        except (RuntimeError, dist.DistError) as exc:
            failed = self._join(wait=5)
            if failed:
                raise RuntimeError(f"a data-parallel training process exited with {failed[0]} (its error is "
                                   f"above); this one stopped with: {exc}") from exc
            raise

    def _join(self, wait: float, kill: bool = False) -> list[int]:
        """Wait up to `wait` s for each other process (then kill it, with `kill`); the exit codes of
        those that failed."""
        for p in self._others:
            p.join(timeout=wait)
            if kill and p.is_alive():
                p.kill()
                p.join()
        return [p.exitcode for p in self._others if p.exitcode not in (0, None)]

    def __exit__(self, kind: type[BaseException] | None, *rest: Any) -> None:
        failed = self._join(wait=TIMEOUT.total_seconds() if kind is None else 5, kill=True)
        if self._tmp is not None:
            self._tmp.cleanup()
        if failed and kind is None:
            raise RuntimeError(f"a data-parallel training process exited with {failed[0]}")


def _worker(rank: int, size: int, store: str, job: Callable[..., Any], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    with _joined(rank, size, Path(store)):
        job(Group(rank, size), *args)


@contextmanager
def _joined(rank: int, size: int, store: Path) -> Iterator[None]:
    # Every process is on this machine: gloo talks over loopback rather than whatever address the
    # hostname resolves to (in containers, often one no process listens on).
    loopback = "GLOO_SOCKET_IFNAME" not in os.environ and Path("/sys/class/net/lo").exists()
    if loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size, timeout=TIMEOUT)
    finally:
        if loopback:
            del os.environ["GLOO_SOCKET_IFNAME"]
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
