"""The wake-up workload for `werkfluss worker wake_flows` (bench/wakeups.py starts the workers).

A run parks on a hook; the step after it returns the time it started, so the
bench process measures "hook delivered -> next step starts" with one clock.
"""

from __future__ import annotations

import time

from werkfluss import hook, step, workflow


@step
async def started_at() -> float:
    return time.time()


@workflow
async def probe(token: str) -> float:
    await hook(token)
    return await started_at()
