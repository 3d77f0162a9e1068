"""The schedule of the schedule kill storm (``werkfluss worker tests.faults.schedule_flows``).

`tick` runs every second (`NAME`, ``every="1s"``); ``overlap="allow"``, so that a tick
whose previous run is held up by a killed worker (until its lease lapses) still fires:
every tick must have its run. Each execution of its one step writes a ``tick <step key>
<pid> <unix time> <tick>`` row to the fault ledger before its work (`flows.work`'s
``exec`` row, which `Faults.check` reads): when each tick's run started, on this
machine's clock, and the tick it was given.

Two barriers in the middle of firing a tick (``<point>@<tick ms>``, see `flows.barrier`):
``after-claim_tick`` once a worker's claim on the tick succeeded (before its enqueue), and
``before-advance_schedule`` once the tick's run is enqueued (before the schedule's state
records it as fired). A worker SIGKILLed at either must leave the tick to the others: one
run, started once.

Only worker processes import this module: a test process importing it would declare the
schedule for every in-process worker of the session.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from werkfluss import schedule, step, step_key, workflow
from werkfluss._store import RedisStore

from .flows import barrier, row, work

__all__ = ["NAME", "started", "tick"]

NAME = "faults-every-second"


@step(name="faults:tick-started")
async def started(at: float) -> float:
    key = step_key()
    row("tick", key, f"{at:.3f}")
    await work(key)
    return at


@schedule(every="1s", overlap="allow", name=NAME)
@workflow(name="faults:tick")
async def tick(at: datetime) -> float:
    return await started(at.timestamp())


_claim_tick = RedisStore.claim_tick
_advance_schedule = RedisStore.advance_schedule


async def _claim_then_stop(self: RedisStore, name: str, tick: int, holder: str, lasts: float) -> str:
    claim = await _claim_tick(self, name, tick, holder, lasts)
    if claim == "mine":
        await barrier("after-claim_tick", str(tick))
    return claim


async def _stop_then_advance(self: RedisStore, name: str, tick: int, outcome: str, **options: Any) -> bool:
    if outcome == "fired":
        await barrier("before-advance_schedule", str(tick))
    return await _advance_schedule(self, name, tick, outcome, **options)


RedisStore.claim_tick = _claim_then_stop  # type: ignore[method-assign,assignment]
RedisStore.advance_schedule = _stop_then_advance  # type: ignore[method-assign,assignment]
