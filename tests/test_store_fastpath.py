"""The store's fast lane: hand-packed EVALSHA (and XRANGE) on connections of its own.

Whatever goes wrong on the lane (a dropped connection, NOSCRIPT, a late reply,
a cancelled call) must end in the same outcome as redis-py's own path, and
must never leave a connection with an unread reply behind.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast

import anyio
import hiredis
import msgspec
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from werkfluss import Settings, Worker, _store, enqueue_async, start_async, step, workflow
from werkfluss._errors import StorageError, _Suspend
from werkfluss._store import _lane, _run_reads
from werkfluss._store._hooks import TAKE
from werkfluss._store._open import close_stores, open_store
from werkfluss._store._run_log import APPEND

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from werkfluss._store import RedisStore


@step(name="fastpath:double")
async def double(x: int) -> int:
    return 2 * x


@workflow(name="fastpath:chain")
async def chain(n: int) -> int:
    return sum([await double(i) for i in range(n)])


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[RedisStore]:
    yield await open_store(settings)
    await close_stores()


async def new_run(store: RedisStore, run_id: str) -> int:
    got = await store.acquire(
        run_id, workflow="w", holder="h", lease=10.0, started=b"\x90", resumed=b"\x90", args_digest="d"
    )
    assert got.kind == "new"
    return got.epoch


def lane_of(store: RedisStore) -> _lane._FastLane:
    assert store._lane is not None
    return store._lane


# -- packing ---------------------------------------------------------------------------------------------------------


def test_hiredis_packs_commands_as_redis_py_does() -> None:
    from redis.asyncio.connection import Connection

    parts: list[bytes | str | int | float] = [
        b"EVALSHA",
        b"a" * 40,
        3,
        "k1",
        "k2",
        "kü",
        1,
        "c5",
        b"\x00\r\n\xff",
        10000,
        2.5,
    ]
    packed = hiredis.pack_command(cast("Any", tuple(parts)))  # its stub types the tuple as one element
    assert packed == b"".join(Connection().pack_command(*parts))


# -- on a real server ---------------------------------------------------------------------------------------------


async def test_scripts_go_through_the_lane_and_agree_with_redis_py(store: RedisStore) -> None:
    lane = lane_of(store)
    epoch = await new_run(store, "agree")
    assert await store.append("agree", epoch, "c1", b"\x91\x01", 10.0) == (2, None)
    assert lane._idle, "the lane served the call and kept its connection"
    assert await store.append("agree", epoch, "c1", b"\x91\x01", 10.0) == (0, None)  # deduplicated
    store._lane = None  # the same calls through redis-py
    try:
        assert await store.append("agree", epoch, "c1", b"\x91\x01", 10.0) == (0, None)
        assert await store.append("agree", epoch, "c2", b"\x91\x02", 10.0) == (3, None)
        with pytest.raises(_Suspend):
            await store.append("agree", epoch + 1, "c3", b"\x91\x03", 10.0)
        slow = [batch async for batch in store.read_log("agree")]
    finally:
        store._lane = lane
    with pytest.raises(_Suspend):
        await store.append("agree", epoch + 1, "c3", b"\x91\x03", 10.0)
    assert [batch async for batch in store.read_log("agree")] == slow
    assert [index for batch in slow for index, _ in batch] == [1, 2, 3]


async def test_the_lane_and_redis_py_give_one_reply_shape(store: RedisStore) -> None:
    lane = lane_of(store)
    epoch = await new_run(store, "shape")
    await store.append("shape", epoch, "c1", b"\x91\x01", 10.0)
    log, state, queue = store.key("shape", "log"), store.key("shape", "state"), f"{store.prefix}{{shape}}:queue"
    await store.client.xgroup_create(queue, "g", id="0", mkstream=True)
    await store.client.xadd(queue, {"r": "a"})
    await store.client.xadd(queue, {"r": "a"})
    same = [
        ("XRANGE", log, "-", "+", "COUNT", 10),
        ("XREVRANGE", log, "+", "-", "COUNT", 1),
        ("HGET", state, "status"),
        ("ZADD", store.runs_key, "NX", 1, "shape"),
        ("ZREM", store.queue_key("timers"), "shape"),
        ("BLPOP", f"{store.prefix}{{shape}}:nudge", "0.01"),
        ("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "BLOCK", 10, "STREAMS", queue, ">"),  # a message each
        ("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "BLOCK", 10, "STREAMS", queue, ">"),  # none left: None
    ]
    for parts in same:
        on_lane, through_redis_py = await lane.call(parts), await store._raw.execute_command(*parts)
        if parts[0] == "XREADGROUP" and on_lane is not None:  # two messages, one shape: {stream: [[id, fields]]}
            ((stream, ((_, fields),)),), ((stream2, ((_, fields2),)),) = on_lane.items(), through_redis_py.items()
            assert stream == stream2 == queue.encode() and fields == fields2 == [b"r", b"a"]
        else:
            assert on_lane == through_redis_py, parts
    # A script's false comes back as nil on both paths, RESP3 or not.
    token = f"{store.prefix}shape"
    await store.client.xadd(store.hook_key(token, "box"), {"other": "1"})
    keys = [store.hook_key(token, "box"), store.hook_key(token, "meta")]
    args: list[bytes | str | int | float] = ["shape", "0-0"]
    on_lane = await store._run(TAKE, keys, args)
    store._lane = None
    try:
        assert await store._run(TAKE, keys, args) == on_lane and on_lane[0] == b"payload" and on_lane[2] is None
    finally:
        store._lane = lane


async def test_a_long_log_is_read_in_batches_on_the_lane(store: RedisStore) -> None:
    epoch = await new_run(store, "long")
    count = _run_reads._LOG_BATCH + 7
    for seq in range(count):
        await store.append("long", epoch, f"c{seq}", msgspec.msgpack.encode(seq), 10.0)
    await store.client.xadd(store.key("long", "log"), {"other": "1"}, id=f"0-{count + 3}")
    batches = [batch async for batch in store.read_log("long")]
    assert [len(b) for b in batches] == [_run_reads._LOG_BATCH, 9]
    entries = [entry for batch in batches for entry in batch]
    assert entries[1:-1] == [(seq + 2, msgspec.msgpack.encode(seq)) for seq in range(count)]
    assert entries[-1] == (count + 3, None)  # an entry without the event field


async def test_noscript_falls_back_to_redis_py_which_loads_the_script(store: RedisStore) -> None:
    epoch = await new_run(store, "noscript")
    await store.client.script_flush()  # as after a server restart
    assert await store.append("noscript", epoch, "c1", b"\x90", 10.0) == (2, None)
    assert await store.client.script_exists(APPEND.sha) == [True]
    assert await store.append("noscript", epoch, "c2", b"\x90", 10.0) == (3, None)


async def test_a_connection_killed_under_the_lane_costs_a_fallback_not_a_failure(store: RedisStore) -> None:
    lane = lane_of(store)
    epoch = await new_run(store, "killed")
    assert await store.append("killed", epoch, "c1", b"\x90", 10.0) == (2, None)
    (conn, _), *_ = lane._idle
    assert conn._writer is not None
    conn._writer.transport.abort()  # the connection dies while idle
    await anyio.sleep(0.01)
    assert await store.append("killed", epoch, "c2", b"\x90", 10.0) == (3, None)
    await store.client.client_kill_filter(_type="normal", skipme=True)  # the server drops every other connection
    assert await store.append("killed", epoch, "c3", b"\x90", 10.0) == (4, None)
    assert await store.append("killed", epoch, "c3", b"\x90", 10.0) == (0, None)
    log = [index for batch in [b async for b in store.read_log("killed")] for index, _ in batch]
    assert log == [1, 2, 3, 4]  # nothing recorded twice


async def test_a_cancelled_call_closes_its_connection_instead_of_reusing_it(store: RedisStore) -> None:
    lane = lane_of(store)
    key = f"{store.prefix}{{blocked}}:list"
    with anyio.move_on_after(0.2) as scope:
        await lane.call((b"BLPOP", key, 5))  # the reply is still owed when the call is cancelled
    assert scope.cancelled_caught
    assert not lane._waiting and all(conn._writer is not None for conn, _ in lane._idle)
    await store.client.rpush(key, "x")  # BLPOP's owed reply would now arrive on that connection
    assert await lane.call((b"PING",)) == b"PONG"
    assert await lane.call((b"LPOP", key)) == b"x"  # still there: the cancelled BLPOP is gone with its connection


async def test_a_reply_later_than_the_socket_timeout_misses(store: RedisStore) -> None:
    lane = lane_of(store)
    lane._timeout = 0.2
    key = f"{store.prefix}{{slow}}:list"
    with anyio.fail_after(3):
        assert await lane.call((b"BLPOP", key, 2)) is _lane._MISS
    assert not lane._waiting
    assert await lane.call((b"PING",)) == b"PONG"


async def test_a_refused_command_is_a_storage_error_and_the_connection_stays_usable(store: RedisStore) -> None:
    lane = lane_of(store)
    with pytest.raises(ResponseError, match="unknown command"):
        await lane.call((b"NO-SUCH-COMMAND",))
    await store.client.set(store.key("s", "log"), "not a stream")
    with pytest.raises(StorageError, match="refused a command"):
        async for _ in store.read_log("s"):
            pass
    assert len(lane._idle) == 1
    assert await lane.call((b"PING",)) == b"PONG"


async def test_a_closed_store_closes_the_lane(settings: Settings) -> None:
    store = await open_store(settings)
    lane = lane_of(store)
    await new_run(store, "closing")
    conns = [conn for conn, _ in lane._idle]
    await close_stores()
    assert conns and all(conn._writer is None for conn in conns)
    assert await lane.call((b"PING",)) is _lane._MISS


async def test_workflows_and_workers_run_on_the_lane_without_falling_back(settings: Settings) -> None:
    assert await start_async(chain.options(settings=settings, run_id="lane-run"), 50) == 2450
    assert await start_async(chain.options(settings=settings, run_id="lane-run"), 50) == 2450
    store = await open_store(settings)
    ids = [await enqueue_async(chain.options(settings=settings), n) for n in range(5)]
    async with Worker(settings=settings, concurrency=2):
        with anyio.fail_after(20):
            while [await store.status(run_id) for run_id in ids] != ["completed"] * 5:
                await anyio.sleep(0.02)
    assert lane_of(store).misses == 0  # every reply was understood: nothing silently took the slow path
    info = await lane_of(store).call((b"CLIENT", b"INFO"))
    assert re.search(rb"\bresp=3\b", info)  # the protocol of redis-py's connections, whose reply shapes it gives
    await close_stores()


def test_a_cluster_client_keeps_redis_py_s_path() -> None:
    cluster = RedisCluster(host="127.0.0.1", port=7)  # never connected
    assert _store.RedisStore(cluster, prefix="t:", where="test")._lane is None


async def test_the_lane_can_be_turned_off(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WERKFLUSS_FAST_LANE", "0")
    store = await open_store(settings)
    assert store._lane is None
    assert await start_async(chain.options(settings=settings, run_id="no-lane"), 3) == 6
    await close_stores()
