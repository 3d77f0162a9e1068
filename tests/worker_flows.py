"""Workflows that worker processes in the tests import (``werkfluss worker tests.worker_flows``).

Each step execution appends a line to the ledger file named by
``WF_LEDGER``: ``<step key> <pid> <start time>``, written before the body
runs, so the ledger counts executions, the log counts completions.
"""

from __future__ import annotations

import os
import sys
import time

import anyio

from werkfluss import StepFailedError, sleep, step, step_key, workflow

from .helpers import append_to_ledger


def _mark() -> None:
    append_to_ledger(f"{step_key()} {os.getpid()} {time.time():.6f}\n")


@step
async def add(total: int, x: int) -> int:
    """Add, slowly enough that workers die in the middle of steps."""
    _mark()
    await anyio.sleep(float(os.environ.get("WF_STEP_DELAY", "0.01")))
    return total + x


@workflow
async def five(n: int) -> int:
    """Five chained steps: n + (n+1) + ... + (n+4)."""
    total = 0
    for i in range(5):
        total = await add(total, n + i)
    return total


@workflow
async def nap_then_add(n: int, seconds: float) -> int:
    """A step, a durable sleep, a step."""
    total = await add(0, n)
    await sleep(seconds)
    return await add(total, 1)


@step
async def leave(code: int) -> None:
    """A step that calls sys.exit(): it fails its attempt, never its worker."""
    _mark()
    sys.exit(code)


@workflow
async def exits(code: int, catch: bool) -> str:
    """Calls `leave`, catching its failure or not."""
    if not catch:
        await leave(code)
    try:
        await leave(code)
    except StepFailedError as exc:
        return f"caught {exc.error_type}: {exc.error_message}"
    return "not reached"


@workflow
async def quits(code: int) -> int:
    """A workflow body that calls sys.exit() after a step: its run fails, never its worker."""
    sys.exit(await add(0, code))


def expected_five(n: int) -> int:
    """What `five(n)` returns."""
    return sum(n + i for i in range(5))
