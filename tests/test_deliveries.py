"""How the queue counts deliveries: a message handed back keeps its count, and the
messages of a dead worker are blamed only when nothing there was on probation.

These drive the queue scripts directly with consumer names standing for workers
(a consumer that stops renewing its messages is a worker that died), on both
servers; tests/faults/test_poison.py shows the same with real worker processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import pytest

from werkfluss._store._open import close_stores, open_store
from werkfluss._worker import GROUP

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from werkfluss import Settings
    from werkfluss._store import RedisStore


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[RedisStore]:
    opened = await open_store(settings)
    await opened.ensure_group(GROUP)
    yield opened
    await close_stores()


async def deliveries(store: RedisStore, message: str) -> int:
    """The server's delivery count of a pending message."""
    entry = await store.client.xpending_range(store.queue_key("queue"), GROUP, message, message, 1)
    return int(entry[0]["times_delivered"])


async def read(store: RedisStore, consumer: str, count: int = 10) -> list[str]:
    return [m for m, _ in await store.read_queue(GROUP, consumer, count, block=0.1)]


async def die(store: RedisStore, consumer: str) -> None:
    """`consumer` stops renewing its messages: make them idle for ten minutes, as if it died then."""
    key = store.queue_key("queue")
    for entry in await store.client.xpending_range(key, GROUP, "-", "+", 100, consumername=consumer):
        await store.client.xclaim(key, GROUP, consumer, 0, [entry["message_id"]], idle=600_000, justid=True)


async def reclaim(
    store: RedisStore, consumer: str, held: tuple[str, ...] = (), **options: int | bool
) -> tuple[list[tuple[str, dict[str, str], bool]], list[tuple[str, str]]]:
    """What `consumer` claims with a one-minute lease: only the messages of workers that died."""
    max_deliveries = int(options.pop("max_deliveries", 5))
    suspect = bool(options.pop("suspect", True))
    return await store.reclaim(GROUP, consumer, 60, 10, max_deliveries, suspect=suspect, held=held)


async def test_a_message_handed_back_keeps_the_deliveries_that_failed_before(store: RedisStore) -> None:
    # A hand-back used to write a fresh message whose count started at 1 again: a run
    # that killed a worker and was then handed back by the next one never reached
    # max_deliveries. The delivery that ended in a clean hand-back does not count.
    await store.enqueue("run-a")
    [first] = await read(store, "worker-1")
    await die(store, "worker-1")
    claimed, _ = await reclaim(store, "worker-2", max_deliveries=3)
    assert [(m, suspect) for m, _, suspect in claimed] == [(first, True)]
    await store.end_probation("worker-2", first)
    await store.requeue(GROUP, first, "run-a")  # worker-2 stops gracefully
    [second] = await read(store, "worker-3")
    await die(store, "worker-3")
    assert second != first
    _, fields = cast("list[Any]", await store.client.xrange(store.queue_key("queue"), second, second))[0]
    assert fields == {b"r": b"run-a", b"d": b"1"}
    claimed, buried = await reclaim(store, "worker-4", max_deliveries=3)
    assert [m for m, _, _ in claimed] == [second] and buried == []
    await die(store, "worker-4")  # dies on probation: that is 3 deliveries
    claimed, buried = await reclaim(store, "worker-5", max_deliveries=3)
    assert claimed == []
    assert buried == [("run-a", "delivered 3 times without finishing; last error: no worker finished it")]


async def test_a_message_handed_back_at_every_stop_is_never_dead_lettered(store: RedisStore) -> None:
    await store.enqueue("run-b", retry=True)
    for i in range(6):  # six deploys, each stopping the worker that held it
        [message] = await read(store, f"worker-{i}")
        await store.requeue(GROUP, message, "run-b", retry=True)
    [message] = await read(store, "worker-last")
    _, fields = cast("list[Any]", await store.client.xrange(store.queue_key("queue"), message, message))[0]
    assert fields == {b"r": b"run-b", b"x": b"1"}  # nothing counted, the retry flag kept
    assert (await store.dead_letters(10)) == []


async def test_the_messages_of_a_dead_worker_are_suspects_claimed_one_at_a_time(store: RedisStore) -> None:
    for run in ("run-1", "run-2", "run-3"):
        await store.enqueue(run)
    held = await read(store, "dead-worker")
    assert len(held) == 3
    await die(store, "dead-worker")
    claimed, _ = await reclaim(store, "worker-a")
    assert [(m, suspect) for m, _, suspect in claimed] == [(held[0], True)]  # one suspect, nothing else
    assert await store.client.hget(store.queue_key("probation"), "worker-a") == held[0].encode()
    claimed, _ = await reclaim(store, "worker-a", suspect=False)
    assert claimed == []  # while one is on probation here, no other suspect comes
    claimed, _ = await reclaim(store, "worker-b")
    assert [(m, suspect) for m, _, suspect in claimed] == [(held[1], True)]
    assert [await deliveries(store, m) for m in held] == [2, 2, 1]


async def test_a_worker_that_dies_with_a_suspect_on_probation_blames_that_one_only(store: RedisStore) -> None:
    await store.enqueue("suspect")
    [suspect] = await read(store, "first-victim")
    await die(store, "first-victim")
    claimed, _ = await reclaim(store, "prober")
    assert [m for m, _, _ in claimed] == [suspect]
    for run in ("bystander-1", "bystander-2"):  # in flight beside it, read before its probation
        await store.enqueue(run)
    bystanders = await read(store, "prober")
    await die(store, "prober")  # its bystanders are claimed as they were; the suspect's count grows
    claimed, _ = await reclaim(store, "rescuer")
    assert sorted((m, s) for m, _, s in claimed) == sorted([(suspect, True), *((b, False) for b in bystanders)])
    assert [await deliveries(store, m) for m in bystanders] == [1, 1]
    assert await deliveries(store, suspect) == 3
    # The dead worker's probation record went with its last message.
    assert await store.client.hget(store.queue_key("probation"), "prober") is None
    await store.end_probation("rescuer", bystanders[0])  # not the one on probation there: kept
    assert await store.client.hget(store.queue_key("probation"), "rescuer") == suspect.encode()
    await store.end_probation("rescuer", suspect)
    assert await store.client.hget(store.queue_key("probation"), "rescuer") is None


async def test_a_suspect_that_keeps_killing_its_workers_is_dead_lettered_alone(store: RedisStore) -> None:
    await store.enqueue("poison")
    [poison] = await read(store, "victim-0")
    await die(store, "victim-0")
    for i in range(1, 3):
        await store.enqueue(f"healthy-{i}")
        claimed, buried = await reclaim(store, f"victim-{i}", max_deliveries=3)
        assert [(m, s) for m, _, s in claimed if m == poison] == [(poison, True)] and buried == []
        await read(store, f"victim-{i}")  # a healthy run beside it, then the worker dies
        await die(store, f"victim-{i}")
    claimed, buried = await reclaim(store, "survivor", max_deliveries=3)
    assert buried == [("poison", "delivered 3 times without finishing; last error: no worker finished it")]
    assert sorted(f["r"] for _, f, s in claimed if not s) == ["healthy-1", "healthy-2"]


async def test_a_worker_whose_renewals_stall_does_not_count_a_delivery_of_what_it_holds(store: RedisStore) -> None:
    # Its own message looks abandoned (idle past the lease) when its renewals stall; its
    # reclaim loop claimed it back every round, raising the count toward the dead letters.
    await store.enqueue("run-stalled")
    [message] = await read(store, "stalled")
    await die(store, "stalled")
    for _ in range(3):
        claimed, buried = await reclaim(store, "stalled", held=(message,))
        assert claimed == [] and buried == []
    assert await deliveries(store, message) == 1
    claimed, _ = await reclaim(store, "another")  # another worker does take it over
    assert [(m, suspect) for m, _, suspect in claimed] == [(message, True)]
    assert await deliveries(store, message) == 2
