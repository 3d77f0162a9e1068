"""The workflow `check.py` checks: 20 steps, then a hook nobody delivers, so every run stays in flight.

Its worker processes (``werkfluss worker check_flows``) and the ``werkfluss check check_flows``
it times import it by this name, from bench/. Each step returns a msgspec Struct, so the check's
schema pass decodes a typed result per recorded step, as it would for a real workflow.
"""

from __future__ import annotations

import os

import msgspec

from werkfluss import hook, step, workflow

STEPS = 20


class Part(msgspec.Struct, frozen=True):
    """What each step returns."""

    n: int
    order: str
    note: str


@step(name="gate.part")
async def part(order: str, n: int) -> Part:
    return Part(n=n, order=order, note="x" * 40)


@step(name="gate.done")
async def done(order: str) -> int:
    marks = os.environ.get("WF_CHECK_DONE")
    if marks:  # one line per run that got through its steps: the bench waits for all of them
        fd = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (order + "\n").encode())  # one write in append mode: lines never interleave
        finally:
            os.close(fd)
    return STEPS


@workflow(name="gate.order")
async def order(order_id: str) -> str:
    for n in range(STEPS - 1):
        await part(order_id, n)
    await done(order_id)
    approved = await hook(f"approve:{order_id}", type=bool)
    return "approved" if approved else "refused"
