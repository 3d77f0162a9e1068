"""What the queues show from outside: `list_queues`, `queue_info`, why a run waits (`get_run`),
and the dead letters, re-drives and depth of every queue, with real workers holding real slots."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import pytest

from werkfluss import (
    ConfigurationError,
    KeyLoad,
    Queue,
    QueueDepth,
    QueueInfo,
    Worker,
    dead_letters_async,
    enqueue_async,
    get_run_async,
    list_queues_async,
    queue_depth_async,
    queue_info_async,
    redrive_async,
    step,
    workflow,
)
from werkfluss._store._open import open_store

from .helpers import (
    every_server,  # noqa: F401 - the `server` fixture: each test runs on the cluster too
    statuses,
    until_all,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from werkfluss import Settings


started: Counter[str] = Counter()
gates: dict[str, anyio.Event] = {}
RESET = (started, gates)


@step
async def hold(n: int) -> int:
    started["all"] += 1
    await gates["open"].wait()
    return n


@workflow(name="qi.held")
async def held(n: int) -> int:
    return await hold(n)


@workflow(name="qi.quick")
async def quick(n: int) -> int:
    return n


def unique(what: str) -> str:
    return f"t-qi-{what}-{uuid.uuid4().hex[:8]}"


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    """Poll `check` until it holds; fail after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.02)


async def by_status(settings: Settings, run_ids: list[str], wanted: str) -> list[str]:
    store = await open_store(settings)
    return [r for r in run_ids if await store.status(r) == wanted]


# -- concurrency: running, waiting, why ------------------------------------------------------------------------------


async def test_a_full_queue_shows_its_running_and_waiting_runs_and_why_they_wait(wf: Settings) -> None:
    invoices = Queue(unique("conc"), concurrency=2)
    gates["open"] = anyio.Event()
    ids = [await enqueue_async(held.options(settings=wf, queue=invoices), n) for n in range(5)]
    async with Worker(settings=wf, concurrency=10, queues=[invoices]):
        await until(lambda: _started(2))
        info = await queue_info_async(invoices.name, settings=wf)
        assert info == QueueInfo(
            name=invoices.name,
            partitions=1,
            declared=f"Queue({invoices.name!r}, concurrency=2)",
            limited=True,
            concurrency=2,
            waiting=3,
            running=2,
            delayed=0,
            ready=0,
            oldest_waiting=info.oldest_waiting,
            busiest_keys=[KeyLoad(key="", running=2, waiting=3)],
        )
        assert info.oldest_waiting is not None and 0 <= info.oldest_waiting < 60
        assert (await statuses(wf, ids)) == Counter({"pending": 3, "running": 2})
        for run_id in await by_status(wf, ids, "pending"):
            run = await get_run_async(run_id, settings=wf)
            assert (run.queue, run.due, run.waiting_on) == (
                invoices.name,
                None,
                f"concurrency of {invoices.name} (2/2)",
            )
        for run_id in await by_status(wf, ids, "running"):
            run = await get_run_async(run_id, settings=wf)
            assert (run.queue, run.waiting_on) == (invoices.name, None)
        listed = {q.name: q for q in await list_queues_async(settings=wf)}
        assert next(iter(listed)) == "default"
        assert (listed[invoices.name].waiting, listed[invoices.name].running) == (3, 2)
        assert listed[invoices.name].busiest_keys == []  # list_queues leaves the keys to queue_info
        assert await queue_depth_async(queue=invoices.name, settings=wf) == QueueDepth(waiting=3, in_flight=2)
        gates["open"].set()
        await until_all(wf, ids, timeout=30)
    after = await queue_info_async(invoices.name, settings=wf)
    assert (after.waiting, after.running, after.oldest_waiting, after.busiest_keys) == (0, 0, None, [])
    assert (await get_run_async(ids[0], settings=wf)).waiting_on is None


async def _started(n: int) -> bool:
    return started["all"] >= n


async def test_per_key_limits_show_in_the_busiest_keys_and_in_why_a_run_waits(wf: Settings) -> None:
    tenants = Queue(unique("keys"), concurrency=10, per_key=1)
    gates["open"] = anyio.Event()
    acme = [await enqueue_async(held.options(settings=wf, queue=tenants, key="acme"), n) for n in range(3)]
    beta = [await enqueue_async(held.options(settings=wf, queue=tenants, key="beta"), n) for n in range(10, 12)]
    solo = await enqueue_async(held.options(settings=wf, queue=tenants, key="solo"), 20)
    async with Worker(settings=wf, concurrency=10, queues=[tenants]):
        await until(lambda: _started(3))
        info = await queue_info_async(tenants.name, top=2, settings=wf)
        assert (info.waiting, info.running, info.per_key, info.concurrency) == (3, 3, 1, 10)
        assert info.busiest_keys == [
            KeyLoad(key="acme", running=1, waiting=2),
            KeyLoad(key="beta", running=1, waiting=1),
        ]
        everything = await queue_info_async(tenants.name, settings=wf)
        assert everything.busiest_keys[-1] == KeyLoad(key="solo", running=1, waiting=0)
        for run_id in await by_status(wf, acme, "pending"):
            reason = (await get_run_async(run_id, settings=wf)).waiting_on
            assert reason == f"concurrency of key 'acme' in {tenants.name} (1/1)"
        gates["open"].set()
        await until_all(wf, [*acme, *beta, solo], timeout=30)


# -- rates, delays, turns --------------------------------------------------------------------------------------------


async def test_a_full_rate_window_is_why_a_run_waits(wf: Settings) -> None:
    metered = Queue(unique("rate"), rate="2/min")
    per_key = Queue(unique("keyrate"), key_rate="1/min")
    ids = [await enqueue_async(quick.options(settings=wf, queue=metered), n) for n in range(3)]
    keyed = [await enqueue_async(quick.options(settings=wf, queue=per_key, key="acme"), n) for n in range(10, 12)]
    async with Worker(settings=wf, concurrency=10, queues=[metered, per_key]):
        await until(lambda: _count(wf, [*ids, *keyed], "completed", 3))
        [late] = await by_status(wf, ids, "pending")
        await until(lambda: _reason(wf, late, f"rate of {metered.name} (2/min)"))
        [second] = await by_status(wf, keyed, "pending")
        await until(lambda: _reason(wf, second, f"rate of key 'acme' in {per_key.name} (1/min)"))
    info = await queue_info_async(metered.name, settings=wf)
    assert (info.rate, info.key_rate, info.waiting, info.running) == ("2/min", None, 1, 0)
    assert (await queue_info_async(per_key.name, settings=wf)).key_rate == "1/min"


async def _count(settings: Settings, run_ids: list[str], wanted: str, n: int) -> bool:
    return (await statuses(settings, run_ids))[wanted] == n


async def _reason(settings: Settings, run_id: str, wanted: str) -> bool:
    return (await get_run_async(run_id, settings=settings)).waiting_on == wanted


async def test_a_delayed_run_shows_when_it_is_due(wf: Settings) -> None:
    before = datetime.now(UTC)
    run_id = await enqueue_async(quick.options(settings=wf, delay="1h"), 1)
    run = await get_run_async(run_id, settings=wf)
    assert run.status == "pending" and run.queue == "default" and run.due is not None
    assert before + timedelta(minutes=59) < run.due < before + timedelta(minutes=61)
    assert run.waiting_on == f"delayed until {run.due:%Y-%m-%d %H:%M:%S} UTC"
    default = (await list_queues_async(settings=wf))[0]
    assert (default.name, default.limited, default.delayed, default.waiting, default.declared) == (
        "default",
        False,
        1,
        0,
        "Queue('default')",
    )


async def test_runs_nobody_serves_yet_wait_their_turn(wf: Settings) -> None:
    plain = Queue(unique("plain"))
    limited = Queue(unique("turns"), concurrency=5)
    before = time.time()
    plain_ids = [await enqueue_async(quick.options(settings=wf, queue=plain), n) for n in range(3)]
    turn_ids = [await enqueue_async(quick.options(settings=wf, queue=limited), n) for n in range(10, 13)]
    for ahead, run_id in enumerate(plain_ids):
        assert (await get_run_async(run_id, settings=wf)).waiting_on == (
            f"its turn in {plain.name} ({ahead} run{'' if ahead == 1 else 's'} ahead)"
        )
    for ahead, run_id in enumerate(turn_ids):
        assert (await get_run_async(run_id, settings=wf)).waiting_on == (
            f"its turn in {limited.name} ({ahead} run{'' if ahead == 1 else 's'} ahead)"
        )
    for name in (plain.name, limited.name):
        info = await queue_info_async(name, settings=wf)
        assert (info.waiting, info.running, info.delayed) == (3, 0, 0)
        assert info.oldest_waiting is not None and 0 <= info.oldest_waiting <= time.time() - before + 1
    assert (await queue_info_async(plain.name, settings=wf)).limited is False
    assert await queue_depth_async(settings=wf) == QueueDepth(waiting=6, in_flight=0)


async def test_a_partitioned_queue_adds_up_its_partitions_and_shows_its_whole_limits(wf: Settings) -> None:
    spread = Queue(unique("parts"), concurrency=5, rate="10/s", per_key=3, partitions=2)
    keys = [f"k{n}" for n in range(8)]
    for n, key in enumerate(keys):
        await enqueue_async(quick.options(settings=wf, queue=spread, key=key), n)
    info = await queue_info_async(spread.name, top=20, settings=wf)
    assert (info.partitions, info.concurrency, info.rate, info.per_key) == (2, 5, "10/s", 3)
    assert info.declared == f"Queue({spread.name!r}, concurrency=5, per_key=3, rate='10/s', partitions=2)"
    assert info.waiting == 8
    assert sorted(k.key for k in info.busiest_keys) == keys
    assert all((k.running, k.waiting) == (0, 1) for k in info.busiest_keys)


async def test_an_unknown_queue_is_refused_naming_the_known_ones(wf: Settings) -> None:
    known = Queue(unique("known"))
    with pytest.raises(ConfigurationError, match=r"there is no queue 'no-such'.*known queues: default, .*") as err:
        await queue_info_async("no-such", settings=wf)
    assert known.name in str(err.value)
    with pytest.raises(ConfigurationError, match="there is no queue 'no-such'"):
        await dead_letters_async(queue="no-such", settings=wf)
    with pytest.raises(ConfigurationError, match="top must be a whole number"):
        await queue_info_async(known.name, top=-1, settings=wf)


# -- dead letters of every queue -------------------------------------------------------------------------------------


async def test_dead_letters_of_every_queue_are_listed_oldest_first_and_redriven_to_their_queue(wf: Settings) -> None:
    billing = Queue(unique("dead"), concurrency=1)
    run_id = await enqueue_async(quick.options(settings=wf, queue=billing), 7)
    store = await open_store(wf)
    [tag] = billing.tags()
    await store.bury("lost-run", "hook:t1", "no run could take it (test)")
    await store.forget_waiting(run_id, queue=tag)  # as if a worker had given up on it
    await store.bury(run_id, "queue", "poison (test)", queue=tag)
    letters = await dead_letters_async(settings=wf)
    assert [(d.run_id, d.queue, d.reason) for d in letters] == [
        ("lost-run", "default", "no run could take it (test)"),
        (run_id, billing.name, "poison (test)"),
    ]
    assert [d.run_id for d in await dead_letters_async(queue=billing.name, settings=wf)] == [run_id]
    assert [d.run_id for d in await dead_letters_async(limit=1, settings=wf)] == ["lost-run"]
    assert await queue_depth_async(queue=billing.name, settings=wf) == QueueDepth(waiting=0, in_flight=0)

    mine = letters[1].id
    assert re.fullmatch(r"\d+-\d+", letters[0].id) and mine.endswith(f"@{billing.name}")  # the ID names its queue
    with pytest.raises(ConfigurationError, match=f"dead letter '{mine}' is in queue '{billing.name}', not in queue"):
        await redrive_async(mine, queue="default", settings=wf)
    assert await redrive_async(mine.replace(billing.name, "default"), settings=wf) is None
    assert await redrive_async(mine, settings=wf) == mine
    assert [d.run_id for d in await dead_letters_async(settings=wf)] == ["lost-run"]
    assert await queue_depth_async(queue=billing.name, settings=wf) == QueueDepth(waiting=1, in_flight=0)
    assert (await queue_info_async(billing.name, settings=wf)).waiting == 1
    async with Worker(settings=wf, queues=[billing]):
        await until_all(wf, [run_id], timeout=30)


async def test_dead_letters_of_two_partitions_are_told_apart_by_their_ids(wf: Settings) -> None:
    spread = Queue(unique("deadparts"), partitions=2)
    await enqueue_async(quick.options(settings=wf, queue=spread), 1)  # declares it on the server
    store = await open_store(wf)
    for n, tag in enumerate(spread.tags()):
        await store.bury(f"run-{n}", "hook:t", f"lost {n} (test)", queue=tag)
    letters = await dead_letters_async(queue=spread.name, settings=wf)
    assert sorted((d.run_id, d.id.split("@")[1]) for d in letters) == [
        ("run-0", f"{spread.name}:0"),
        ("run-1", f"{spread.name}:1"),
    ]
    second = next(d for d in letters if d.run_id == "run-1")
    assert await redrive_async(second.id, settings=wf) == second.id
    assert [d.run_id for d in await dead_letters_async(settings=wf)] == ["run-0"]
