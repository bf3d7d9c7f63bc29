"""The micro-batcher's closing rules, on a real event loop (timings generous for a busy CI box)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from loragen.api.batching import MicroBatcher, Wanted, run_wanted


def _batcher(calls: list[list[int]], **kwargs: float) -> MicroBatcher[int, int]:
    async def run(jobs: list[int], wanted: object) -> list[int]:
        calls.append(list(jobs))
        return [j * 10 for j in jobs]

    return MicroBatcher(run, lambda j: j % 2, **kwargs)  # type: ignore[arg-type]


def test_requests_within_max_wait_share_a_batch_and_groups_split_it() -> None:
    async def main() -> list[list[int]]:
        calls: list[list[int]] = []
        batcher = _batcher(calls, max_batch=32, max_wait_s=2.0)

        async def later(job: int, delay: float) -> int:
            await asyncio.sleep(delay)
            return await batcher.submit(job)

        batcher.start()
        # Arrivals 0.1 s apart, all within max_wait of the first: one batch.
        results = await asyncio.gather(*(later(j, 0.1 * j) for j in range(6)))
        await batcher.stop()
        assert results == [j * 10 for j in range(6)]
        return calls

    assert asyncio.run(main()) == [[0, 2, 4], [1, 3, 5]]  # one batch, one call per group


def test_max_batch_and_max_wait_close_a_batch() -> None:
    async def main() -> list[list[int]]:
        calls: list[list[int]] = []
        batcher = _batcher(calls, max_batch=4, max_wait_s=0.2)
        batcher.start()
        await asyncio.gather(*(batcher.submit(2 * j) for j in range(10)))
        await batcher.stop()
        return calls

    assert [len(c) for c in asyncio.run(main())] == [4, 4, 2]


def test_a_batch_waits_only_until_it_is_as_large_as_recent_ones() -> None:
    async def main() -> tuple[list[list[int]], float, float]:
        calls: list[list[int]] = []
        batcher = _batcher(calls, max_batch=32, max_wait_s=0.3)
        loop = asyncio.get_running_loop()

        async def later(job: int, delay: float) -> int:
            await asyncio.sleep(delay)
            return await batcher.submit(job)

        batcher.start()
        # No history: the first batch waits the whole max_wait for company.
        await asyncio.gather(*(later(2 * j, 0.1 * (j == 3)) for j in range(4)))
        # Four at a time recently: three queued at once wait for the fourth (0.1 s later), not longer.
        started = loop.time()
        await asyncio.gather(*(later(2 * j, 0.1 * (j == 3)) for j in range(4)))
        waited_for_fourth = loop.time() - started
        # A lone client: batches of one for a while, and then a request is decoded at once.
        for _ in range(8):
            await batcher.submit(0)
        started = loop.time()
        await batcher.submit(0)
        alone = loop.time() - started
        await batcher.stop()
        return calls, waited_for_fourth, alone

    calls, waited_for_fourth, alone = asyncio.run(main())
    assert [len(c) for c in calls[:2]] == [4, 4]
    assert 0.09 <= waited_for_fourth < 0.28 and alone < 0.15


def test_a_costly_group_runs_in_calls_of_at_most_max_cost() -> None:
    async def main() -> list[list[int]]:
        calls: list[list[int]] = []

        async def run(jobs: list[int], wanted: object) -> list[int]:
            calls.append(list(jobs))
            return [j * 10 for j in jobs]

        batcher = MicroBatcher(run, lambda j: 0, max_batch=8, max_wait_s=0.2, cost=lambda j: j, max_cost=5)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(j) for j in (3, 2, 4, 9, 1)))
        await batcher.stop()
        assert results == [30, 20, 40, 90, 10]
        return calls

    assert asyncio.run(main()) == [[3, 2], [4], [9], [1]]  # a job over max_cost alone runs alone


def test_a_call_whose_clients_all_left_is_cancelled_before_it_runs() -> None:
    async def main() -> tuple[list[list[int]], list[int]]:
        calls: list[list[int]] = []
        ran: list[int] = []
        gate = asyncio.Event()

        async def run(jobs: list[int], wanted: object) -> list[int]:
            calls.append(list(jobs))
            await gate.wait()  # the engine is busy
            ran.extend(jobs)
            return jobs

        batcher = MicroBatcher(run, lambda j: j, max_batch=1, max_wait_s=0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        first.cancel()  # its client leaves while its call waits for the engine
        await asyncio.sleep(0.05)
        gate.set()
        assert await batcher.submit(2) == 2
        await batcher.stop()
        return calls, ran

    calls, ran = asyncio.run(main())
    assert calls == [[1], [2]] and ran == [2]


def test_an_engine_that_starts_a_call_after_its_client_left_skips_that_row() -> None:
    """The client's cancellation is visible to the engine thread at once, before the batcher's own
    cancellation of the call has reached the executor (a loop turn later)."""
    gate, ran = threading.Event(), []

    def engine(jobs: list[int], wanted: Wanted) -> list[int | None]:
        gate.wait(10)  # busy with another call until the client has left
        return run_wanted(jobs, wanted, lambda live: ran.extend(live) or live)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            loop = asyncio.get_running_loop()

            async def run(jobs: list[int], wanted: Wanted) -> list[int | None]:
                return await loop.run_in_executor(pool, engine, jobs, wanted)

            batcher = MicroBatcher(run, lambda j: 0, max_batch=4, max_wait_s=0.05)
            batcher.start()
            left = asyncio.ensure_future(batcher.submit(1))
            stays = asyncio.ensure_future(batcher.submit(2))
            await asyncio.sleep(0.2)  # both are in one call, queued on the engine
            left.cancel()
            gate.set()  # the engine starts the call before this loop turns again
            time.sleep(0.2)
            assert await stays == 2
            await batcher.stop()

    asyncio.run(main())
    assert ran == [2]


def test_run_wanted_keeps_the_rows_order_and_skips_an_empty_call() -> None:
    calls: list[list[str]] = []

    def upper(rows: list[str]) -> list[str]:
        calls.append(rows)
        return [r.upper() for r in rows]

    assert run_wanted(["a", "b", "c"], lambda: [True, False, True], upper) == ["A", None, "C"]
    assert run_wanted(["a"], lambda: [False], upper) == [None]
    assert run_wanted(["a", "b"], None, upper) == ["A", "B"]
    assert calls == [["a", "c"], ["a", "b"]]
