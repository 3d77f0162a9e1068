"""Workflows that worker processes in tests/test_deadlines.py import (``werkfluss worker tests.deadline_flows``).

A step execution appends ``<step key> <pid> <start time>`` to the ledger file
named by ``WF_LEDGER`` before its body runs, so the test sees which process
executed it, and when.
"""

from __future__ import annotations

import os
import time

import anyio

from werkfluss import step, step_key, workflow

from .helpers import append_to_ledger


@step
async def linger(seconds: float) -> str:
    """Take `seconds`: long enough to be killed in, or cancelled by a deadline."""
    append_to_ledger(f"{step_key()} {os.getpid()} {time.time():.6f}\n")
    await anyio.sleep(seconds)
    return "lingered"


@workflow
async def slow_job(seconds: float) -> str:
    """One slow step; its deadline comes from the run's options, so only the store knows it."""
    return await linger(seconds)
