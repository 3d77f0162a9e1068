"""Wake-ups are pushed to workers, not polled (issue 14, item 5).

A hook delivery, a child's end, or a timer due sooner than the others nudges a
waiting worker, which moves the run to the queue at once; between nudges a worker
sleeps until the next timer is due. So these tests give the worker a look interval
(`poll`) far longer than their deadlines: with a poll, each would wait for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from werkfluss import Worker, cancel_async, enqueue_async, hook, invoke_hook_async, sleep, step, workflow
from werkfluss._store._open import open_store

from .helpers import until_all

if TYPE_CHECKING:
    from werkfluss import Settings
    from werkfluss._store import RedisStore

LONG_POLL = 60.0  # seconds: a worker that polled would wake these runs only after this
WITHIN = 20.0  # seconds any single wake-up below may take on a loaded machine (a third of the poll)


@step(name="wk.echo")
async def echo(value: str) -> str:
    return value


@workflow(name="wk.approval")
async def approval(token: str) -> str:
    decision = await hook(token, type=str)
    return await echo(decision)


@workflow(name="wk.child")
async def child(token: str) -> str:
    return await approval(token)


@workflow(name="wk.parent")
async def parent(token: str) -> str:
    return "parent got " + await child.options(run_id=f"child-of-{token}")(token)


@workflow(name="wk.nap")
async def nap(seconds: float) -> str:
    await sleep(seconds)
    return await echo(f"slept {seconds:g}")


async def wait_status(settings: Settings, run_id: str, status: str) -> None:
    store = await open_store(settings)
    with anyio.fail_after(WITHIN):
        while await store.status(run_id) != status:
            await anyio.sleep(0.01)


async def test_a_hook_delivery_reaches_a_worker_at_once_whatever_its_poll(wf: Settings) -> None:
    async with Worker(settings=wf, poll=LONG_POLL):
        run_id = await enqueue_async(approval.options(settings=wf, run_id="approve-1"), "approve:1")
        await wait_status(wf, run_id, "paused")
        await invoke_hook_async("approve:1", "yes", settings=wf)
        await until_all(wf, [run_id], timeout=WITHIN)


async def test_a_childs_end_wakes_its_parent_at_once(wf: Settings) -> None:
    async with Worker(settings=wf, poll=LONG_POLL):
        run_id = await enqueue_async(parent.options(settings=wf, run_id="parent-1"), "approve:child")
        await wait_status(wf, "child-of-approve:child", "paused")
        await wait_status(wf, run_id, "paused")
        await invoke_hook_async("approve:child", "fine", settings=wf)
        await until_all(wf, [run_id], timeout=WITHIN)
    store = await open_store(wf)
    assert await store.status("child-of-approve:child") == "completed"


async def test_a_timer_due_sooner_than_the_one_a_worker_sleeps_towards_fires_on_time(wf: Settings) -> None:
    async with Worker(settings=wf, poll=LONG_POLL):
        late = await enqueue_async(nap.options(settings=wf, run_id="nap-late"), 45.0)
        await wait_status(wf, late, "paused")  # the worker now sleeps until it is due, 45 s away
        soon = await enqueue_async(nap.options(settings=wf, run_id="nap-soon"), 3.0)
        await until_all(wf, [soon], timeout=WITHIN)
        store = await open_store(wf)
        assert await store.status(late) == "paused"
        await cancel_async(late, settings=wf)


async def test_an_idle_worker_sends_about_one_command_a_second_besides_its_blocking_read(wf: Settings) -> None:
    # Counted by the server (INFO commandstats): this test's worker is the only client at work.
    store = await open_store(wf)
    # The default queue alone: a worker serves every queue its process declares, and the suite's
    # modules declare many (each queue is a blocking read a second when idle).
    async with Worker(settings=wf, queues=["default"]) as worker:
        await until_all(wf, [await enqueue_async(nap.options(settings=wf), 0.0)])  # it has served once
        before = await _sent(store)
        with anyio.move_on_after(IDLE):  # a window to count in, not a synchronisation
            await worker.wait()  # idle: nothing is enqueued
        after = await _sent(store)
    sent = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    sent["info"] = sent.get("info", 0) - 1  # our own
    sent = {name: n for name, n in sent.items() if n}
    reads = sent.pop("xreadgroup", 0)
    assert IDLE / 2 <= reads <= IDLE + 2, sent  # BLOCK 1 s: about one a second
    assert sum(sent.values()) <= IDLE * 1.5, sent  # it was ten MOVE_DUE polls a second


IDLE = 8.0  # seconds


async def _sent(store: RedisStore) -> dict[str, int]:
    """Calls per command that clients sent (not those scripts run inside the server)."""
    info = await store.client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}
    return {name: calls.get(name, 0) for name in _CLIENT_COMMANDS}


_CLIENT_COMMANDS = ("evalsha", "eval", "xreadgroup", "blpop", "ping", "zadd", "xadd", "hgetall", "info", "zrem")
