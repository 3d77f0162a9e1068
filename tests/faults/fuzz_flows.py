"""Workflows the hostile-input test's worker serves (``werkfluss worker tests.faults.fuzz_flows``)."""

from __future__ import annotations

from werkfluss import hook, step, workflow


@step(name="fz.square")
async def square(x: int) -> int:
    return x * x


@workflow(name="fz.healthy")
async def healthy(n: int) -> int:
    """A plain run that must keep completing while garbage arrives."""
    return await square(n) + await square(n + 1)


@workflow(name="fz.inbox")
async def inbox(token: str) -> int:
    """Sum integer payloads delivered to `token` until a 0 arrives."""
    total = 0
    async for payload in hook(token, type=int):
        if payload == 0:
            return total
        total += payload
    return total  # pragma: no cover - the loop above only returns
