"""Workflows of the scale scenarios (bench/scale.py), imported by its worker processes
as ``werkfluss worker scale_flows`` (cwd or PYTHONPATH: bench/) and by scale.py itself.

Environment of the worker processes:

- ``WF_STEP_DELAY``: seconds of async I/O (``anyio.sleep``) in each `io_step` (default 0.01).
- ``WF_LEDGER``: a file that each step execution appends ``<step key> <pid> <start time>`` to,
  before its body runs: the ledger counts executions, the log counts completions.
- ``WF_HOLD``: if set, seconds that step ``n % steps + 1`` of ``io_chain(n, steps)`` sleeps
  instead: run n completes n % steps steps quickly, then stays in flight in the next one
  (R-35's workers are killed while every run is held so, at a different step).
"""

from __future__ import annotations

import os
import time

import anyio

from werkfluss import hook, step, step_key, workflow

STEP_DELAY = float(os.environ.get("WF_STEP_DELAY", "0.01"))
LEDGER = os.environ.get("WF_LEDGER", "")
HOLD = float(os.environ.get("WF_HOLD", "0"))


def _mark() -> None:
    if LEDGER:
        line = f"{step_key()} {os.getpid()} {time.time():.6f}\n"
        fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())  # one small O_APPEND write: lines never interleave
        finally:
            os.close(fd)


# -- runs of a few steps of async I/O ---------------------------------------


@step
async def io_step(total: int, x: int, hold: bool = False) -> int:
    """About STEP_DELAY seconds of async I/O (HOLD seconds if `hold` and HOLD is set), then a sum."""
    _mark()
    await anyio.sleep(HOLD if hold and HOLD else STEP_DELAY)
    return total + x


@workflow
async def io_chain(n: int, steps: int) -> int:
    """`steps` chained I/O steps: n + (n+1) + ... + (n+steps-1)."""
    total = 0
    for i in range(steps):
        total = await io_step(total, n + i, i == n % steps)
    return total


def expected_io_chain(n: int, steps: int) -> int:
    """What `io_chain(n, steps)` returns."""
    return sum(n + i for i in range(steps))


@workflow
async def parked(n: int) -> int:
    """One step, then it waits on the hook ``bench-parked:<n>`` (the run is paused, not held)."""
    total = await io_step(0, n)
    payload = await hook(token=f"bench-parked:{n}")
    return total + int(payload)


# -- one long run, replayed ---------------------------------------------------------


@step
async def tick(i: int) -> int:
    return i


# The replay's "bug": the run fails once after its K steps; with the flag off ("fixed
# code") the next start replays the K steps from the log and completes.
FAIL_AT_END = True


class BenchFailure(Exception):
    """Raised by `long_chain` while FAIL_AT_END is set."""


@workflow
async def long_chain(k: int) -> int:
    total = 0
    for i in range(k):
        total += await tick(i)
    if FAIL_AT_END:
        raise BenchFailure("failing once after all steps, on purpose")
    return total
