"""The queues and workflows of bench/queues.py; its worker processes run `serve` (``python -c``).

Each workflow is one step that returns the time it started, so the bench computes start
delays and throughput with this machine's one clock. The workflows carry explicit names, so
a process that runs this file as a script and one that imports it agree on them.
"""

from __future__ import annotations

import signal
import sys
import time

import anyio

from werkfluss import Queue, Worker, step, workflow

# Every limit on, none binding at the bench's rates: what admission costs by itself.
limits = Queue("bench-limits", concurrency=10_000, per_key=1_000, rate="50000/s", key_rate="50000/s", priority=True)
concurrency_only = Queue("bench-conc", concurrency=10_000)
fair = Queue("bench-fair", per_key=2)
rated = Queue("bench-rate", rate="50/s")


@step(name="bench:started_at")
async def started_at(i: int) -> float:
    return time.time()


@workflow(name="bench:plain")
async def plain(i: int) -> float:
    return await started_at(i)


@workflow(name="bench:limited", queue=limits)
async def limited(i: int) -> float:
    return await started_at(i)


@workflow(name="bench:conc", queue=concurrency_only)
async def conc(i: int) -> float:
    return await started_at(i)


@workflow(name="bench:fair", queue=fair)
async def fair_one(i: int) -> float:
    return await started_at(i)


@workflow(name="bench:rated", queue=rated)
async def rated_one(i: int) -> float:
    return await started_at(i)


def serve(queues: list[str], concurrency: int) -> None:
    """A worker serving `queues` only (``Worker(queues=...)``), from the environment's settings;
    prints ``serving`` once it does, stops gracefully on SIGTERM or SIGINT."""

    async def main() -> None:
        async with Worker(queues=queues, concurrency=concurrency) as worker:
            print("serving", flush=True)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    worker.stop()
                    break

    anyio.run(main, backend="asyncio")


if __name__ == "__main__":
    serve(sys.argv[2].split(","), int(sys.argv[1]))
