"""The timer herd for ``werkfluss worker timer_flows`` (bench/timers.py starts the workers).

Every run of `herd` sleeps until one moment, then runs `woke`, which appends ``<n> <unix
time>`` to the file ``$WF_BENCH_STARTS`` before it returns: the bench reads lateness (that
time minus the moment) and whether each run fired once from it, on this machine's one
clock, without reading 10,000 run logs.

With ``WF_BENCH_MOVES=<file>`` the process also appends ``<moved> <unix time before>
<unix time after>`` to that file for each call of the store's `move_due` that moved
timers: MOVE_DUE's batches and their round trips, as the worker saw them.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

from werkfluss import sleep_until, step, workflow
from werkfluss._store import RedisStore

__all__ = ["herd", "woke"]


def _append(variable: str, line: str) -> None:
    # One O_APPEND write per line: the lines of several worker processes never interleave.
    path = os.environ.get(variable)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


@step(name="bench:woke")
async def woke(n: int) -> float:
    """Note when run `n` got past its sleep; returns that time."""
    now = time.time()
    _append("WF_BENCH_STARTS", f"{n} {now:.6f}\n")
    return now


@workflow(name="bench:herd")
async def herd(n: int, at: float) -> float:
    """Sleep until Unix time `at` (the same moment for every run), then `woke`."""
    await sleep_until(datetime.fromtimestamp(at, UTC))
    return await woke(n)


if os.environ.get("WF_BENCH_MOVES"):
    _move_due = RedisStore.move_due

    async def _counted(self: RedisStore, limit: int = 100, *, queue: str = "q") -> tuple[int, float | None]:
        before = time.time()
        moved, nxt = await _move_due(self, limit, queue=queue)
        if moved:
            _append("WF_BENCH_MOVES", f"{moved} {before:.6f} {time.time():.6f}\n")
        return moved, nxt

    RedisStore.move_due = _counted  # type: ignore[method-assign,assignment]
