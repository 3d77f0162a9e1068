"""The same code on a real three-master Redis Cluster: replay, runs spread over every
master, hooks, durable sleep, cancel, the queue with a worker, and NOSCRIPT recovery."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

import anyio
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from werkfluss import (
    Queue,
    RunCancelledError,
    Settings,
    StorageError,
    Worker,
    cancel_async,
    enqueue_async,
    get_run_async,
    hook,
    invoke_hook_async,
    sleep,
    start_async,
    step,
    workflow,
)
from werkfluss._events import HookReceived, RunPaused, TimerStarted
from werkfluss._store import RedisStore
from werkfluss._store._open import close_stores, open_store
from werkfluss._store._runs import ACQUIRE

from .helpers import events, until_all, until_status
from .servers import RedisCluster3, free_port

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from werkfluss import Workflow

executed: Counter[str] = Counter()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    """One cluster for the whole module: forming it takes just over 2 s."""
    nodes = RedisCluster3(tmp_path_factory.mktemp("cluster"))
    yield nodes
    nodes.stop()


@pytest.fixture
async def cs(cluster: RedisCluster3, prefix: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Settings]:
    """Settings for the cluster with the test's own prefix (so its own queue too)."""
    executed.clear()
    # Timers this far off pause the run instead of waiting in memory; tests keep them short.
    yield Settings(redis_url=cluster.url, prefix=prefix, hold=0.05)
    await close_stores()


def keys_by_node(cluster: RedisCluster3, prefix: str) -> dict[int, set[str]]:
    """The keys under `prefix` each master actually holds (SCAN is local to a node)."""
    found: dict[int, set[str]] = {}
    for node in cluster.nodes:
        client = node.client(decode_responses=True)
        try:
            found[node.port] = set(client.scan_iter(match=f"{prefix}*", count=1000))
        finally:
            client.close()
    return found


@step
async def cluster_reserve(item: str) -> str:
    executed["reserve"] += 1
    return f"reserved {item}"


@step
async def cluster_charge(item: str) -> int:
    executed["charge"] += 1
    return len(item) * 100


@step
async def cluster_ship(item: str, cents: int) -> str:
    executed["ship"] += 1
    return f"shipped {item} for {cents}"


@workflow
async def cluster_order(item: str) -> list[str]:
    reserved = await cluster_reserve(item)
    cents = await cluster_charge(item)
    shipped = await cluster_ship(item, cents)
    return [reserved, shipped]


async def test_a_url_naming_one_node_gets_a_cluster_client_and_a_rerun_replays(cs: Settings) -> None:
    store = await open_store(cs)
    assert isinstance(store.client, RedisCluster)
    first = await start_async(cluster_order.options(settings=cs, run_id="order-1"), "lamp")
    assert first == ["reserved lamp", "shipped lamp for 400"]
    assert executed == {"reserve": 1, "charge": 1, "ship": 1}
    assert await start_async(cluster_order.options(settings=cs, run_id="order-1"), "lamp") == first
    assert executed == {"reserve": 1, "charge": 1, "ship": 1}  # recorded: nothing executed again
    assert await store.status("order-1") == "completed"


async def test_runs_spread_over_all_three_masters(cs: Settings, cluster: RedisCluster3) -> None:
    run_ids = [f"spread-{i}" for i in range(30)]
    store = await open_store(cs)
    slots = {run: key_slot(store.key(run, "state").encode()) for run in run_ids}
    for run in run_ids:  # a run's keys share its slot, so one script may touch them all
        assert {key_slot(store.key(run, p).encode()) for p in ("state", "log", "steps")} == {slots[run]}
    async with anyio.create_task_group() as tg:
        for run in run_ids:
            tg.start_soon(start_async, cluster_order.options(settings=cs, run_id=run), run)
    assert executed == {"reserve": 30, "charge": 30, "ship": 30}
    held = keys_by_node(cluster, cs.prefix)
    owners = {port for port, keys in held.items() for run in run_ids if store.key(run, "state") in keys}
    assert len(owners) == 3, f"run keys landed on {sorted(owners)} only"
    for run in run_ids:  # each run's three keys sit together on exactly one master
        homes = [port for port, keys in held.items() if {store.key(run, p) for p in ("state", "log", "steps")} <= keys]
        assert len(homes) == 1
    for run in run_ids[:5]:
        assert await start_async(cluster_order.options(settings=cs, run_id=run), run) == [
            f"reserved {run}",
            f"shipped {run} for {len(run) * 100}",
        ]
    assert executed["ship"] == 30


@workflow
async def cluster_approval(token: str) -> str:
    await cluster_reserve(token)
    payload = await hook(token=token)
    await sleep(0.3)
    return f"approved by {payload['by']}"


@workflow
async def cluster_forgotten(token: str) -> str:
    await cluster_reserve(token)
    return str(await hook(token=token))


async def test_a_hook_a_durable_sleep_and_a_cancel_round_trip(cs: Settings) -> None:
    token = f"approve:{cs.prefix}"
    task = asyncio.create_task(start_async(cluster_approval.options(settings=cs, run_id="approval"), token))
    await until_status(cs, "approval", "paused")
    began = time.monotonic()
    await invoke_hook_async(token, {"by": "ana"}, settings=cs)
    with anyio.fail_after(10):
        assert await task == "approved by ana"
    assert time.monotonic() - began >= 0.3
    log = await events(cs, "approval")
    assert [e.token for e in log if isinstance(e, HookReceived)] == [token]
    assert any(isinstance(e, TimerStarted) for e in log)
    paused = [e for e in log if isinstance(e, RunPaused)]
    assert [w.kind for e in paused for w in e.waits] == ["hook", "timer"]  # both waits parked the run
    assert executed["reserve"] == 1

    other = f"never:{cs.prefix}"
    task = asyncio.create_task(start_async(cluster_forgotten.options(settings=cs, run_id="forgotten"), other))
    await until_status(cs, "forgotten", "paused")
    assert await cancel_async("forgotten", "nobody answered", settings=cs) is True
    with anyio.fail_after(10), pytest.raises(RunCancelledError, match="nobody answered"):
        await task
    assert await (await open_store(cs)).status("forgotten") == "cancelled"
    assert await cancel_async("forgotten", settings=cs) is False


@step
async def cluster_square(n: int) -> int:
    executed[f"square-{n}"] += 1
    return n * n


@workflow
async def cluster_job(n: int) -> int:
    return await cluster_square(n) + 1


async def test_a_worker_drains_twenty_enqueued_runs(cs: Settings) -> None:
    run_ids = [await enqueue_async(cluster_job.options(settings=cs), n) for n in range(20)]
    assert len(set(run_ids)) == 20
    store = await open_store(cs)
    assert {await store.status(run) for run in run_ids} == {"pending"}
    async with Worker(settings=cs) as worker:
        with anyio.fail_after(15):
            while [await store.status(run) for run in run_ids] != ["completed"] * 20:
                await anyio.sleep(0.05)
    assert worker.stopping
    assert executed == {f"square-{n}": 1 for n in range(20)}
    for n in range(20):  # the queue recorded each result; a start attaches to it
        assert await start_async(cluster_job.options(settings=cs), n) == n * n + 1
    assert await store.queue_depth("workers") == (0, 0)


async def test_runs_survive_a_script_cache_flush(cs: Settings) -> None:
    store = await open_store(cs)
    assert isinstance(store.client, RedisCluster)
    assert await start_async(cluster_order.options(settings=cs, run_id="before-flush"), "a") == [
        "reserved a",
        "shipped a for 100",
    ]
    sha = ACQUIRE.sha
    await store.client.script_flush()  # every primary forgets the scripts (as after a restart)
    assert await store.client.script_exists(sha) == [False]
    assert await start_async(cluster_order.options(settings=cs, run_id="after-flush"), "b") == [
        "reserved b",
        "shipped b for 100",
    ]
    assert await store.client.script_exists(sha) == [True]  # NOSCRIPT made redis-py load it on every primary


async def test_each_master_is_checked_and_errors_name_the_redacted_url(
    cluster: RedisCluster3, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="werkfluss"):
        store = await RedisStore.connect(prefix=prefix, url=cluster.url)
        await store.close()
    lossy = [r.getMessage() for r in caplog.records if "no persistence" in r.getMessage()]
    assert sorted(m.split("(node 127.0.0.1:")[1].split(")")[0] for m in lossy) == sorted(map(str, cluster.ports))

    # A cluster has only database 0: the first node asked says so, and the message names the URL.
    port = cluster.ports[1]
    with pytest.raises(StorageError, match=r"redis://:\*\*\*@127\.0\.0\.1:\d+/1 .*not allowed in cluster mode") as info:
        await RedisStore.connect(prefix=prefix, url=f"redis://:hunter2@127.0.0.1:{port}/1")
    assert "hunter2" not in str(info.value)


async def test_an_unreachable_url_names_the_redacted_url() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match=r"cannot reach redis://:\*\*\*@127\.0\.0\.1") as info:
        await RedisStore.connect(prefix="t:", url=url)
    assert "hunter2" not in str(info.value)


# -- named queues with flow control on the cluster ------------------------------------------------------------------

# Each queue's hash tag decides its master: these three land on the three masters (slots 0-5460,
# 5461-10922, 10923-16383), and the eight partitions of c-hot spread over all three.
c_notify = Queue("c-notify", concurrency=2)
c_sms = Queue("c-sms", concurrency=3, per_key=1, rate="500/s", priority=True)
c_mail = Queue("c-mail", per_key=2, key_rate="200/s")
c_hot = Queue("c-hot", concurrency=16, per_key=2, partitions=8)
c_limits = Queue("c-limits", concurrency=3, per_key=1)
c_part = Queue("c-part", concurrency=8, per_key=1, partitions=4)  # 2 per partition
SLOT_BOUNDS = (0, 5461, 10923, 16384)  # RedisCluster3 gives node i the slots bounds[i] .. bounds[i + 1] - 1

flowing: Counter[str] = Counter()  # executions of a queue's step in progress, by queue, queue/key, queue/tag
peak: Counter[str] = Counter()  # the most there were at once


@step
async def cluster_hold(queue: str, key: str, tag: str, seconds: float) -> str:
    names = (queue, f"{queue}/{key}", f"{queue}@{tag}")
    for name in names:
        flowing[name] += 1
        peak[name] = max(peak[name], flowing[name])
    try:
        await anyio.sleep(seconds)
    finally:
        for name in names:
            flowing[name] -= 1
    return key


def queued_flow(queue: Queue) -> Workflow[[str, int, float], str]:
    async def body(key: str, n: int, seconds: float) -> str:
        return await cluster_hold(queue.name, key, queue.tag_for(key, ""), seconds)

    body.__name__ = body.__qualname__ = f"cluster_{queue.name.replace('-', '_')}"
    return workflow(queue=queue)(body)


flows = {q.name: queued_flow(q) for q in (c_notify, c_sms, c_mail, c_hot, c_limits, c_part)}


def master_of(tag: str) -> int:
    """The index of the node that owns queue tag `tag`'s slot."""
    slot = key_slot(f"x{{{tag}}}:queue".encode())
    return next(i for i in range(3) if SLOT_BOUNDS[i] <= slot < SLOT_BOUNDS[i + 1])


async def enqueue_many(cs: Settings, queue: Queue, count: int, keys: int, seconds: float) -> list[str]:
    flow, ids = flows[queue.name], []
    for n in range(count):
        key = f"{queue.name}-k{n % keys}"
        options = (
            flow.options(settings=cs, key=key, priority=n % 3) if queue.priority else flow.options(settings=cs, key=key)
        )
        ids.append(await enqueue_async(options, key, n, seconds))
    return ids


async def slots_held(store: RedisStore, queue: Queue) -> tuple[int, int]:
    """(runs holding a slot, keys with a run admitted) over the queue's partitions, from the store."""
    active = running = 0
    for tag in queue.tags():
        active += await store.client.hlen(store.queue_key("active", tag))
        running += await store.client.hlen(store.queue_key("running", tag))
    return active, running


async def test_named_queues_and_a_partitioned_queue_spread_over_the_masters(
    cs: Settings, cluster: RedisCluster3
) -> None:
    flowing.clear()
    peak.clear()
    plan = {c_notify: (6, 3), c_sms: (9, 3), c_mail: (8, 2), c_hot: (48, 24)}  # queue -> (runs, keys)
    ids = {q: await enqueue_many(cs, q, runs, keys, 0.03) for q, (runs, keys) in plan.items()}
    everything = [run for runs in ids.values() for run in runs]
    store = await open_store(cs)
    assert {await store.status(run) for run in everything} == {"pending"}
    async with Worker(settings=cs, concurrency=16, queues=list(plan)):
        await until_all(cs, everything, timeout=60)
    assert Counter([await store.status(run) for run in everything]) == {"completed": len(everything)}
    results = [(await get_run_async(run, settings=cs)).result for run in ids[c_notify]]
    assert results == [f"c-notify-k{n % 3}" for n in range(6)]

    # Every limit held, on whichever master the queue lives.
    assert peak["c-notify"] <= 2
    assert peak["c-sms"] <= 3
    assert max(peak[f"c-sms/c-sms-k{i}"] for i in range(3)) == 1
    assert max(peak[f"c-mail/c-mail-k{i}"] for i in range(2)) <= 2
    assert max(peak[f"c-hot/c-hot-k{i}"] for i in range(24)) <= 2
    assert peak["c-hot"] <= 16
    assert all(peak[f"c-hot@{tag}"] <= 2 for tag in c_hot.tags())  # each partition its share: 16 / 8

    # Each queue's keys live together on the master of its tag, and the queues on more than one master.
    held = keys_by_node(cluster, cs.prefix)
    port_of = {i: node.port for i, node in enumerate(cluster.nodes)}
    homes: dict[str, set[int]] = {}
    for queue in plan:
        for tag in queue.tags():
            mine = {key for keys in held.values() for key in keys if key.startswith(f"{cs.prefix}{{{tag}}}:")}
            assert {f"{cs.prefix}{{{tag}}}:config", f"{cs.prefix}{{{tag}}}:queue"} <= mine, sorted(mine)
            homes[tag] = {port for port, keys in held.items() if mine & keys}
            assert homes[tag] == {port_of[master_of(tag)]}, f"{tag}'s keys are on {homes[tag]}"
    singles = {next(iter(homes[q.tags()[0]])) for q in (c_notify, c_sms, c_mail)}
    assert len(singles) == 3, f"the three one-slot queues landed on {sorted(singles)}"
    partitions = {next(iter(homes[tag])) for tag in c_hot.tags()}
    assert partitions == set(port_of.values()), f"c-hot's partitions landed on {sorted(partitions)} only"
    # Runs went through every partition (each submit counts in its partition's config).
    for tag in c_hot.tags():
        config = await store.queue_config(tag)
        assert config["concurrency"] == "2" and config["per_key"] == "2"
        assert int(config["seq"]) >= 1, f"no run went through partition {tag}"
    assert {await store.queue_of(run) for run in ids[c_hot]} == set(c_hot.tags())
    for queue in plan:  # no slot is left held once every run is done
        assert await slots_held(store, queue) == (0, 0)


async def test_concurrency_and_per_key_hold_on_the_cluster(cs: Settings) -> None:
    flowing.clear()
    peak.clear()
    store = await open_store(cs)
    one = await enqueue_many(cs, c_limits, 24, 6, 0.1)
    parted = await enqueue_many(cs, c_part, 32, 12, 0.1)
    sampled = {"c-limits": 0, "c-part": 0}  # the most slots the store showed held at once
    async with Worker(settings=cs, concurrency=20, queues=[c_limits, c_part]):
        with anyio.fail_after(60):
            while Counter([await store.status(run) for run in one + parted]) != {"completed": 56}:
                for queue in (c_limits, c_part):
                    sampled[queue.name] = max(sampled[queue.name], (await slots_held(store, queue))[0])
                await anyio.sleep(0.02)
    # Exact across the cluster: the queue's one slot holds its limits, and no more than that ran.
    assert peak["c-limits"] == 3, peak
    assert max(peak[f"c-limits/c-limits-k{i}"] for i in range(6)) == 1
    assert 1 <= sampled["c-limits"] <= 3
    # Partitioned: concurrency is 2 per partition (8 over 4), per_key stays exact (a key keeps to one partition).
    assert 2 <= peak["c-part"] <= 8, peak
    assert all(peak[f"c-part@{tag}"] <= 2 for tag in c_part.tags())
    assert max(peak[f"c-part/c-part-k{i}"] for i in range(12)) == 1
    assert 1 <= sampled["c-part"] <= 8
    for queue in (c_limits, c_part):
        assert await slots_held(store, queue) == (0, 0)
