"""A checkout workflow with a retried step, a hook pause and a failing last step:
what the query, timeline, command-line and replay-check tests look at."""

from __future__ import annotations

from collections import Counter

import anyio

from werkfluss import RetryPolicy, Settings, hook, invoke_hook_async, start_async, step, workflow
from werkfluss._store._open import open_store

attempts: Counter[str] = Counter()  # charge attempts by order
executions: Counter[str] = Counter()  # step bodies run, by step
SECRET = "WF-SECRET-7f3a"  # in every argument and result: must never reach a log above DEBUG


@step(name="shop.reserve")
async def reserve(order: str) -> int:
    executions["reserve"] += 1
    await anyio.sleep(0.02)
    return 3


@step(name="shop.charge", retries=RetryPolicy(retries=3, base=0.01))
async def charge(order: str) -> str:
    attempts[order] += 1
    executions["charge"] += 1
    if attempts[order] < 3:  # the gateway fails twice, then takes the payment
        raise ConnectionError("payment gateway timed out")
    return f"receipt-{order}-{SECRET}"


@step(name="shop.ship")
async def ship(order: str, parcels: int) -> str:
    executions["ship"] += 1
    if order.startswith("bad"):  # a courier that does not serve this order
        raise ValueError(f"no courier for {parcels} parcels")
    return f"{order} shipped"


@workflow(name="shop.checkout")
async def checkout(order: str, note: str = SECRET) -> str:
    parcels = await reserve(order)
    receipt = await charge(order)
    await hook(f"approve:{order}", type=bool)
    return await ship(order, parcels) + " " + receipt


async def run_checkout(settings: Settings, order: str, *, approve_after: str = "paused") -> BaseException | str:
    """Run `checkout` for `order` until it ends: deliver the approval once the run
    has paused on its hook. Returns the result or the exception it raised."""
    outcome: list[BaseException | str] = []

    async def drive() -> None:
        try:
            result = await start_async(checkout.options(run_id=order, settings=settings), order)
            outcome.append(result)
        except Exception as exc:
            outcome.append(exc)

    store = await open_store(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drive)
        with anyio.fail_after(20):
            while await store.status(order) != approve_after:
                await anyio.sleep(0.01)
        await invoke_hook_async(f"approve:{order}", True, settings=settings)
    return outcome[0]
