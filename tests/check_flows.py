"""Version 2 of a small fleet's workflows, as a deploy brings it: what the pre-deploy
check (tests/test_check.py, `werkfluss check tests.check_flows`) replays the runs
version 1 recorded against. Version 1 is defined in the test, under the same IDs."""

from __future__ import annotations

from collections import Counter

import msgspec

from werkfluss import hook, step, workflow

executions: Counter[str] = Counter()  # step bodies run, by step: a check runs none


class Quote(msgspec.Struct, frozen=True):
    """Version 2's quote: the price is now a number of cents (version 1 recorded a string)."""

    price: int


@step(name="chk.a")
async def a(order: str) -> int:
    executions["a"] += 1
    return 1


@step(name="chk.b")
async def b(order: str) -> str:
    executions["b"] += 1
    return "b"


@step(name="chk.inserted_step")
async def inserted_step(order: str) -> str:
    executions["inserted_step"] += 1
    return "new"


@step(name="chk.b_renamed")
async def b_renamed(order: str) -> str:
    executions["b_renamed"] += 1
    return "b"


@step(name="chk.quote")
async def quote(order: str) -> Quote:
    executions["quote"] += 1
    return Quote(price=1200)


@step(name="chk.finish")
async def finish(order: str) -> str:
    executions["finish"] += 1
    if order.startswith("bad"):  # the failed runs of the fleet
        raise ValueError(f"cannot finish {order}")
    return "done"


@step(name="chk.extra")
async def extra(order: str) -> str:
    executions["extra"] += 1
    return "extra"


@workflow(name="chk.unchanged")
async def unchanged(order: str) -> str:
    await a(order)
    await b(order)
    await finish(order)
    return str(await hook(f"go:{order}", type=bool))


@workflow(name="chk.inserted")
async def inserted(order: str) -> str:
    await a(order)
    await inserted_step(order)  # v1 called b here
    await b(order)
    await finish(order)
    return str(await hook(f"go:{order}", type=bool))


@workflow(name="chk.renamed")
async def renamed(order: str) -> str:
    await a(order)
    await b_renamed(order)  # v1 called it chk.b
    await finish(order)
    return str(await hook(f"go:{order}", type=bool))


@workflow(name="chk.retyped")
async def retyped(order: str) -> str:
    priced = await quote(order)  # v1's chk.quote returned a Quote with a string price
    await b(order)
    await finish(order)
    return str(priced.price) + str(await hook(f"go:{order}", type=bool))


@workflow(name="chk.appended")
async def appended(order: str) -> str:
    await a(order)
    await b(order)
    await finish(order)
    approved = await hook(f"go:{order}", type=bool)
    return str(approved) + await extra(order)  # new at the end: compatible


@workflow(name="chk.argtyped")
async def argtyped(order: int) -> str:  # v1 took the order as a string
    await a(str(order))
    return "done"


class Approval(msgspec.Struct, frozen=True):
    """Version 2's approval payload: an amount is now required (version 1's payloads had only a note)."""

    note: str
    amount: int


@workflow(name="chk.payload")
async def payload(order: str) -> str:
    approval = await hook(f"pay:{order}", type=Approval)
    await a(order)
    return approval.note + str(await hook(f"go:{order}", type=bool))
