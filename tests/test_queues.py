"""Named queues and their flow control, driven as a user would: declare a `Queue`, enqueue
runs with keys and priorities, serve them with real workers, and watch what executes at once."""

from __future__ import annotations

from collections import Counter

import anyio

from werkfluss import Queue, Settings, Worker, enqueue_async, step, workflow

from .helpers import until_all

smoke = Queue("t-smoke", concurrency=3, per_key=1)
running: Counter[str] = Counter()
most: Counter[str] = Counter()
RESET = (running, most)


@step
async def hold(key: str) -> str:
    running["all"] += 1
    running[key] += 1
    most["all"] = max(most["all"], running["all"])
    most[key] = max(most[key], running[key])
    await anyio.sleep(0.05)
    running["all"] -= 1
    running[key] -= 1
    return key


@workflow(queue=smoke)
async def limited(key: str, n: int) -> str:
    return await hold(key)


async def test_a_queue_runs_at_most_its_concurrency_and_per_key(wf: Settings) -> None:
    ids = [await enqueue_async(limited.options(settings=wf, key=f"k{n % 4}"), f"k{n % 4}", n) for n in range(16)]
    async with Worker(settings=wf, concurrency=10, queues=[smoke]):
        await until_all(wf, ids, timeout=30)
    assert most["all"] == 3
    assert all(most[f"k{i}"] == 1 for i in range(4))
