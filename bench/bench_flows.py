"""The throughput workload for `werkfluss worker bench_flows` (bench/throughput.py starts the workers).

Three trivial async steps; the last returns the time it ran, so the enqueuer
can compute each run's end-to-end latency with one clock (this machine's).
"""

from __future__ import annotations

import time

from werkfluss import step, workflow


@step
async def add_one(x: int) -> int:
    return x + 1


@step
async def finished_at(x: int) -> float:
    return time.time()


@workflow
async def three(i: int) -> float:
    x = await add_one(i)
    x = await add_one(x)
    return await finished_at(x)
