"""Named queues and their flow control, driven as a user would: declare a `Queue`, enqueue
runs with keys, priorities, delays and deduplication IDs, serve them with real workers
(in this process, or worker processes), and watch from the steps what executes when.

What the steps record (`trail`, `running`, `most`) is this process's; the worker
processes of `tests.queue_flows` write a ledger file instead. Where the public API
does not show a queue's insides yet (a run waiting for admission, a slot held, when a
run was admitted), the test reads the store's documented keys (`werkfluss._store._keys`).

Every test that uses a server runs on the embedded Valkey, Debian's redis-server and a
local three-master Redis Cluster (the `server` fixture below): the worker processes and
the CLI reach the cluster by its URL, as a user's would.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import anyio
import msgspec
import pytest

from werkfluss import (
    ConfigurationError,
    Queue,
    Settings,
    Worker,
    cancel_async,
    dead_letters_async,
    enqueue_async,
    get_run_async,
    hook,
    invoke_hook_async,
    list_runs_async,
    redrive_async,
    sleep,
    start_async,
    step,
    workflow,
)
from werkfluss import _queues as queues_registry
from werkfluss._ids import registered_workflows
from werkfluss._store._keys import ACTIVE, DELAYED, GROUP, KEY_RATE, META, WAIT
from werkfluss._store._open import open_store
from werkfluss._worker._take import fail_buried

from . import queue_flows
from .conftest import ROOT
from .helpers import (
    every_server,  # noqa: F401 - the `server` fixture: each test runs on the cluster too
    status,
    until_all,
    until_status,
)
from .workers import Workers, server_env

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from .conftest import Server

# -- what the steps record ---------------------------------------------------------------------------------------------

trail: list[tuple[str, str, float]] = []  # ("start" | "end", label, time.time()), in the order they happened
running: Counter[str] = Counter()  # key -> executing now; "*" all keys
most: Counter[str] = Counter()  # key -> the most executing at once; "*" all keys
gates: dict[str, anyio.Event] = {}  # label -> what its step waits for before it ends
RESET = (trail, running, most, gates)


@step
async def act(label: str, key: str = "", hold: float = 0.0) -> str:
    """Record the start, hold (until the label's gate opens, then `hold` seconds), record the end."""
    trail.append(("start", label, time.time()))
    for counted in ("*", key):
        running[counted] += 1
        most[counted] = max(most[counted], running[counted])
    try:
        gate = gates.get(label)
        if gate is not None:
            await gate.wait()
        await anyio.sleep(hold)
    finally:
        for counted in ("*", key):
            running[counted] -= 1
    trail.append(("end", label, time.time()))
    return label


@workflow
async def job(label: str, key: str = "", hold: float = 0.0) -> str:
    """One step: the unit of every test here (sent to a queue with ``options(queue=...)``)."""
    return await act(label, key, hold)


@workflow
async def pauses(label: str, how: str) -> str:
    """A step, a pause (a durable sleep, or a hook ``go-<label>``), a step."""
    await act(f"{label}:before")
    if how == "sleep":
        await sleep(0.6)
    else:
        await hook(token=f"go-{label}")
    return await act(f"{label}:after")


def starts() -> list[str]:
    """The labels of the steps that started, in order."""
    return [label for what, label, _ in trail if what == "start"]


def started_at(label: str) -> float:
    """When the step labelled `label` started."""
    return next(at for what, name, at in trail if what == "start" and name == label)


def ended_at(label: str) -> float:
    """When the step labelled `label` ended."""
    return next(at for what, name, at in trail if what == "end" and name == label)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)
    assert predicate(), what


def most_in_window(times: list[float], window: float) -> int:
    """The most of `times` within any `window` seconds."""
    times = sorted(times)
    best, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most of the `(start, end)` intervals that overlap at any instant (an end before a start at a tie)."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    level = peak = 0
    for _, change in points:
        level += change
        peak = max(peak, level)
    return peak


@pytest.fixture
def declare() -> Iterator[Callable[..., Queue]]:
    """Declare a queue of a fresh name (tests never share one); forgotten after the test, so that
    later workers started with the default (every declared queue) do not serve it."""
    made: list[str] = []

    def make(stem: str, **limits: Any) -> Queue:
        queue = Queue(f"t-{stem}-{uuid.uuid4().hex[:8]}", **limits)
        made.append(queue.name)
        return queue

    yield make
    for name in made:
        queues_registry._QUEUES.pop(name, None)


def fast(settings: Settings) -> Settings:
    """`settings` where a durable sleep of more than 50 ms pauses its run (and frees its slot)."""
    return msgspec.structs.replace(settings, hold=0.05)


async def waiting_for_admission(settings: Settings, queue: Queue, run_id: str) -> bool:
    """Whether `run_id` waits in `queue`'s admission (not yet given a slot)."""
    store = await open_store(settings)
    return bool(await store.client.hexists(store.queue_key(WAIT, queue.tags()[0]), run_id))


async def admissions(settings: Settings, queue: Queue, key: str) -> dict[str, float]:
    """When each run of `key` was admitted (server ms), from the key's rate window: `queue` needs a `key_rate`."""
    store = await open_store(settings)
    rate = store.queue_key(KEY_RATE + key, queue.tags()[0])
    counted = cast("list[tuple[bytes | str, float]]", await store.client.zrange(rate, 0, -1, withscores=True))
    return {(run.decode() if isinstance(run, bytes) else run): float(ms) for run, ms in counted}


async def slots_held(settings: Settings, tag: str) -> int:
    """How many runs hold a slot of queue partition `tag`."""
    store = await open_store(settings)
    return int(await store.client.hlen(store.queue_key(ACTIVE, tag)))


# -- the smoke test ----------------------------------------------------------------------------------------------------


async def test_a_queue_runs_at_most_its_concurrency_and_per_key(wf: Settings, declare: Callable[..., Queue]) -> None:
    smoke = declare("smoke", concurrency=3, per_key=1)
    ids = [await enqueue_async(job.options(settings=wf, queue=smoke, key=f"k{n % 4}"), f"s{n}", f"k{n % 4}", 0.05)
           for n in range(16)]  # fmt: skip
    async with Worker(settings=wf, concurrency=10, queues=[smoke]):
        await until_all(wf, ids, timeout=30)
    assert most["*"] == 3
    assert all(most[f"k{i}"] == 1 for i in range(4))
    assert await slots_held(wf, smoke.tags()[0]) == 0


# -- 1. named queues, and a run remembers its queue --------------------------------------------------------------------


async def test_a_named_queue_is_served_by_the_workers_of_that_queue_only(
    wf: Settings, declare: Callable[..., Queue]
) -> None:
    limited, plain = declare("limited", concurrency=2), declare("plain")

    @workflow(queue=limited)
    async def on_limited(n: int) -> str:
        return await act(f"limited{n}")

    @workflow(queue=plain.name)  # by its name
    async def on_plain(n: int) -> str:
        return await act(f"plain{n}")

    on_a = await enqueue_async(on_limited.options(settings=wf), 1)
    on_b = await enqueue_async(on_plain.options(settings=wf), 1)
    on_default = await enqueue_async(job.options(settings=wf), "default1")
    store = await open_store(wf)
    assert (await store.state(on_a)).queue == f"q:{limited.name}"
    assert (await store.state(on_b)).queue == f"q:{plain.name}"
    # Each was enqueued before the run a worker of another queue completes: had they shared
    # a stream, that worker would have taken them first.
    async with Worker(settings=wf, queues=["default"]):
        await until_all(wf, [on_default])
    async with Worker(settings=wf, queues=[plain]):
        await until_all(wf, [on_b])
        assert await status(wf, on_a) == "pending"
    assert starts() == ["default1", "plain1"]
    async with Worker(settings=wf, queues=[limited.name]):
        await until_all(wf, [on_a])
    assert starts() == ["default1", "plain1", "limited1"]


async def test_a_run_that_sleeps_frees_its_slot_and_resumes_through_its_queue(
    wf: Settings, declare: Callable[..., Queue]
) -> None:
    one = declare("nap", concurrency=1)
    settings = fast(wf)
    first = await enqueue_async(pauses.options(settings=settings, queue=one), "first", "sleep")
    second = await enqueue_async(job.options(settings=settings, queue=one), "second")
    async with Worker(settings=settings, queues=[one]):
        await until_all(settings, [second])
        assert await status(settings, first) == "paused"  # the second ran in the slot the sleeping first left
        await until_all(settings, [first])
    assert starts() == ["first:before", "second", "first:after"]
    store = await open_store(settings)
    assert (await store.state(first)).queue == one.tags()[0]
    assert await slots_held(settings, one.tags()[0]) == 0


async def test_a_run_woken_by_a_hook_waits_for_a_slot_of_its_queue(wf: Settings, declare: Callable[..., Queue]) -> None:
    one = declare("hooked", concurrency=1)
    settings = fast(wf)
    first = await enqueue_async(pauses.options(settings=settings, queue=one), "first", "hook")
    gates["blocker"] = anyio.Event()
    async with Worker(settings=settings, queues=[one]):
        await until_status(settings, first, "paused")
        blocker = await enqueue_async(job.options(settings=settings, queue=one), "blocker")
        await until(lambda: "blocker" in starts(), "the blocker took the free slot")
        await invoke_hook_async("go-first", "ok", settings=settings)
        # The wake-up goes through the queue's admission: the blocker holds the only slot.
        with anyio.fail_after(10):
            while not await waiting_for_admission(settings, one, first):
                await anyio.sleep(0.01)
        # ... and stays there (a worker asks at once when a run is submitted: one admitted would show at once).
        with anyio.move_on_after(0.3):
            while True:
                assert await waiting_for_admission(settings, one, first)
                assert await status(settings, first) == "paused"
                await anyio.sleep(0.01)
        assert "first:after" not in starts()
        assert (await get_run_async(first, settings=settings)).waiting_on == f"concurrency of {one.name} (1/1)"
        gates["blocker"].set()
        await until_all(settings, [first, blocker])
    assert starts() == ["first:before", "blocker", "first:after"]
    assert started_at("first:after") >= ended_at("blocker")


async def test_a_redriven_dead_letter_goes_back_to_the_runs_queue(wf: Settings, declare: Callable[..., Queue]) -> None:
    one = declare("dead", concurrency=1)
    tag = one.tags()[0]
    poisoned = await enqueue_async(job.options(settings=wf, queue=one), "poisoned")
    store = await open_store(wf)
    await store.ensure_group(GROUP, queue=tag)
    # A worker takes it (holding the only slot) and gives up on it, as one does past max_deliveries.
    [(message, fields)], _, _ = await store.admit(GROUP, "a-worker", 1, queue=tag)
    assert fields["r"] == poisoned
    assert await slots_held(wf, tag) == 1
    await store.dead_letter(GROUP, message, poisoned, "poisoned (test)", queue=tag)
    await fail_buried(store, wf, "a-worker", poisoned, "poisoned (test)")
    [letter] = await dead_letters_async(queue=one.name, settings=wf)
    assert (letter.run_id, letter.queue, letter.reason) == (poisoned, one.name, "poisoned (test)")
    assert await dead_letters_async(queue="default", settings=wf) == []  # its queue's, not the default queue's
    assert await slots_held(wf, tag) == 0  # dead-lettering freed the slot: the next run goes through
    other = await enqueue_async(job.options(settings=wf, queue=one), "other")
    async with Worker(settings=wf, queues=[one]):
        await until_all(wf, [other])
    assert await status(wf, poisoned) == "failed"
    assert await redrive_async(letter.id, settings=wf) == letter.id  # the ID names its queue
    assert await waiting_for_admission(wf, one, poisoned)  # back in its queue, waiting for a slot
    async with Worker(settings=wf, queues=[one]):
        await until_all(wf, [poisoned])
    assert starts() == ["other", "poisoned"]


# -- 2. global concurrency across worker processes ---------------------------------------------------------------------


def _ledger(path: Path) -> list[tuple[str, int, int, float]]:
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(what, int(n), int(pid), float(at)) for what, n, pid, at in rows]


async def test_two_worker_processes_never_execute_more_than_the_queue_concurrency_even_when_one_is_killed(
    wf: Settings, server: Server, prefix: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    env = server_env(server, prefix, WF_LEDGER=str(ledger), WF_STEP_DELAY="0.15", WERKFLUSS_LEASE="1")
    workers = Workers(env, tmp_path, "tests.queue_flows", concurrency=4)  # 8 slots between them, 3 allowed
    try:
        doomed, survivor = workers.spawn(), workers.spawn()
        workers.wait_serving(doomed)
        workers.wait_serving(survivor)
        ids = [await enqueue_async(queue_flows.bounded.options(settings=wf), n) for n in range(30)]
        await until(lambda: sum(row[2] == doomed.pid for row in _ledger(ledger)) >= 3, "the doomed worker to work")
        workers.kill(doomed)  # mid-step: its slots pass with its messages to the survivor
        killed_at = time.time()
        await until_all(wf, ids, timeout=40)
        tag = queue_flows.SHARED.tags()[0]
        with anyio.fail_after(10):
            while await slots_held(wf, tag):  # no slot leaks: each message done frees its own
                await anyio.sleep(0.01)
    finally:
        workers.stop_all()
    rows = _ledger(ledger)
    begun = {(n, pid): at for what, n, pid, at in rows if what == "start"}
    ended = {(n, pid): at for what, n, pid, at in rows if what == "end"}
    # A step the kill interrupted executed until the kill.
    intervals = [(at, ended.get(execution, killed_at)) for execution, at in begun.items()]
    assert {pid for _, _, pid, _ in rows} == {doomed.pid, survivor.pid}
    assert {n for n, _ in ended} == set(range(30))
    assert most_at_once(intervals) == 3, sorted(intervals)


# -- 3. per-key concurrency and fairness -------------------------------------------------------------------------------


async def test_a_key_with_a_long_backlog_does_not_delay_another_key(
    wf: Settings, declare: Callable[..., Queue]
) -> None:
    # A key rate that never binds records each run's admission on the server's clock (in P{q}:rate:<key>, by
    # run ID): first in, first out within a key is that order. The steps' start order is no proof of it: of
    # two runs admitted together, one may start after the other has ended and its successor started.
    fair = declare("fair", per_key=2, key_rate="100000/h")
    a_ids = [await enqueue_async(job.options(settings=wf, queue=fair, key="A"), f"A{n}", "A") for n in range(300)]
    b_ids = [await enqueue_async(job.options(settings=wf, queue=fair, key="B"), f"B{n}", "B") for n in range(5)]
    async with Worker(settings=wf, concurrency=4, queues=[fair]):
        await until_all(wf, a_ids + b_ids, timeout=60)
    order = starts()
    last_b = max(order.index(f"B{n}") for n in range(5))
    a_before = sum(label.startswith("A") for label in order[:last_b])
    print(f"B's 5 runs all started after {a_before} of A's 300")
    assert a_before < 150  # round robin: in fact a handful
    admitted = await admissions(wf, fair, "A")
    assert sorted(admitted) == sorted(a_ids)
    at = [admitted[run] for run in a_ids]
    assert all(earlier <= later for earlier, later in itertools.pairwise(at))  # ties: admitted in one call
    assert most["A"] <= 2 and most["B"] <= 2


async def test_keys_take_turns_for_the_queue_concurrency(wf: Settings, declare: Callable[..., Queue]) -> None:
    # No per-key limit holds the busy key back here: only the turns keep the other key from waiting behind it.
    shared = declare("turns", concurrency=2)
    ids = [await enqueue_async(job.options(settings=wf, queue=shared, key="A"), f"A{n}", "A") for n in range(100)]
    ids += [await enqueue_async(job.options(settings=wf, queue=shared, key="B"), f"B{n}", "B") for n in range(5)]
    async with Worker(settings=wf, concurrency=8, queues=[shared]):
        await until_all(wf, ids, timeout=60)
    order = starts()
    last_b = max(order.index(f"B{n}") for n in range(5))
    a_before = sum(label.startswith("A") for label in order[:last_b])
    print(f"B's 5 runs all started after {a_before} of A's 100")
    assert a_before < 20  # A, B, A, B...: about 5
    assert most["*"] <= 2


async def test_runs_without_a_key_share_one_key(wf: Settings, declare: Callable[..., Queue]) -> None:
    one_each = declare("keyless", per_key=1)
    ids = [await enqueue_async(job.options(settings=wf, queue=one_each), f"none{n}", "", 0.05) for n in range(4)]
    ids += [await enqueue_async(job.options(settings=wf, queue=one_each, key="x"), f"x{n}", "x", 0.05)
            for n in range(2)]  # fmt: skip
    async with Worker(settings=wf, concurrency=8, queues=[one_each]):
        await until_all(wf, ids)
    assert most[""] == 1  # the keyless runs took turns, one at a time
    assert most["x"] == 1
    assert most["*"] == 2  # a keyless run and a keyed one did execute at once


# -- 4. priority -------------------------------------------------------------------------------------------------------


async def test_a_priority_zero_run_goes_next_and_runs_of_one_priority_go_first_in_first_out(
    wf: Settings, declare: Callable[..., Queue]
) -> None:
    urgent_first = declare("prio", concurrency=1, priority=True)

    def on(priority: int | None = None, key: str | None = None) -> Any:
        return job.options(settings=wf, queue=urgent_first, priority=priority, key=key)

    gates["first"] = anyio.Event()
    ids = [await enqueue_async(on(), "first")]
    async with Worker(settings=wf, queues=[urgent_first]):
        await until(lambda: starts() == ["first"], "the first run to start")
        ids += [await enqueue_async(on(7), f"low{n}") for n in range(3)]
        ids += [await enqueue_async(on(), f"mid{n}") for n in range(2)]  # the default, 5
        ids += [await enqueue_async(on(0, key="vip"), "urgent", "vip")]  # enqueued last, of another key
        gates["first"].set()
        await until_all(wf, ids)
    assert starts() == ["first", "urgent", "mid0", "mid1", "low0", "low1", "low2"]


# -- 5. rate limits ----------------------------------------------------------------------------------------------------


async def test_a_queue_rate_starts_no_more_runs_per_window_than_it_allows(
    wf: Settings, declare: Callable[..., Queue]
) -> None:
    # A key rate that never binds records each admission on the server's clock (runs without a key: key "").
    five = declare("rate", rate="5/s", key_rate="100000/h")
    ids = [await enqueue_async(job.options(settings=wf, queue=five), f"r{n}") for n in range(20)]
    async with Worker(settings=wf, queues=[five]):
        await until_all(wf, ids, timeout=30)
    admitted = sorted(ms / 1000 for ms in (await admissions(wf, five, "")).values())
    assert len(admitted) == 20
    assert most_in_window(admitted, 0.999) <= 5  # exact where the limit is kept: any second of the server's clock
    times = [at for what, _, at in trail if what == "start"]
    # A step starts some ms after its admission (more on a loaded machine or a cluster), so the starts of
    # two windows' batches can bunch at their edge (the README says so): never more than two batches.
    assert most_in_window(times, 0.9) <= 10
    spread = max(times) - min(times)
    print(f"20 runs at 5/s started over {spread:.2f} s")
    assert 2.5 < spread < 6  # four windows' worth: 0, 1, 2, 3 s


async def test_resumed_runs_do_not_count_toward_the_rate(wf: Settings, declare: Callable[..., Queue]) -> None:
    two = declare("resumes", rate="2/10s")
    settings = fast(wf)
    ids = [await enqueue_async(pauses.options(settings=settings, queue=two), f"n{n}", "sleep") for n in range(2)]
    began = time.monotonic()
    async with Worker(settings=settings, queues=[two]):
        # Both starts fill the window for 10 s; their resumes after the sleep do not wait for it.
        await until_all(settings, ids, timeout=5)
    assert time.monotonic() - began < 5
    assert sorted(starts()) == ["n0:after", "n0:before", "n1:after", "n1:before"]


async def test_a_key_rate_slows_that_key_and_not_another(wf: Settings, declare: Callable[..., Queue]) -> None:
    per_key = declare("keyrate", key_rate="3/s")
    ids = [await enqueue_async(job.options(settings=wf, queue=per_key, key="busy"), f"busy{n}") for n in range(9)]
    ids += [await enqueue_async(job.options(settings=wf, queue=per_key, key="calm"), f"calm{n}") for n in range(3)]
    async with Worker(settings=wf, queues=[per_key]):
        await until_all(wf, ids, timeout=30)
    busy = [at for what, label, at in trail if what == "start" and label.startswith("busy")]
    calm = [at for what, label, at in trail if what == "start" and label.startswith("calm")]
    # Admissions are exact on the server's clock (the queue rate test reads them); step starts can
    # bunch at a window's edge, two batches at most.
    assert most_in_window(busy, 0.9) <= 6
    assert 1.5 < max(busy) - min(busy) < 5  # three windows: 0, 1, 2 s
    assert max(calm) - min(busy) < 0.5  # the calm key's runs did not wait for the busy key's windows


# -- 6. delayed start --------------------------------------------------------------------------------------------------


async def test_a_delayed_run_stays_pending_until_it_is_due(wf: Settings, declare: Callable[..., Queue]) -> None:
    limited = declare("later", concurrency=2)
    store = await open_store(wf)
    before = time.time()
    delayed = await enqueue_async(job.options(settings=wf, delay="1s"), "delayed")  # the default queue
    at = datetime.now(UTC) + timedelta(seconds=1.2)
    timed = await enqueue_async(job.options(settings=wf, queue=limited, at=at), "timed")
    now = await enqueue_async(job.options(settings=wf, queue=limited), "now")
    for run_id, due in ((delayed, before + 1), (timed, at.timestamp())):
        state = await store.state(run_id)
        assert state.status == "pending"
        assert state.due is not None and abs(state.due / 1000 - due) < 0.5
    assert (await store.state(timed)).queue == limited.tags()[0]
    assert (await store.state(now)).due is None
    shown, shown_timed = await get_run_async(delayed, settings=wf), await get_run_async(timed, settings=wf)
    assert (shown.queue, shown_timed.queue) == ("default", limited.name)
    assert shown.due is not None and abs(shown.due.timestamp() - (before + 1)) < 0.5
    assert shown_timed.due is not None and abs(shown_timed.due.timestamp() - at.timestamp()) < 0.5
    assert (shown_timed.waiting_on or "").startswith("delayed until ")
    assert (await get_run_async(now, settings=wf)).due is None
    async with Worker(settings=wf, queues=["default", limited]):
        await until_all(wf, [now])
        assert await status(wf, delayed) == "pending" and await status(wf, timed) == "pending"
        await until_all(wf, [delayed, timed])
    assert starts()[0] == "now"
    assert started_at("delayed") >= before + 1.0
    assert started_at("timed") >= at.timestamp()
    assert started_at("timed") < at.timestamp() + 3  # and soon after it was due


# -- 7. deduplication --------------------------------------------------------------------------------------------------


async def test_a_dedup_id_returns_the_unfinished_run_and_is_free_again_once_it_ended(
    wf: Settings, declare: Callable[..., Queue]
) -> None:
    limited = declare("dedup", concurrency=1)

    def once() -> Any:
        return job.options(settings=wf, queue=limited, dedup="inv-42")

    first = await enqueue_async(once(), "d1")
    assert await enqueue_async(once(), "d2") == first  # other arguments, same dedup ID: the same run
    gates["d1"] = anyio.Event()
    async with Worker(settings=wf, queues=[limited]):
        await until(lambda: starts() == ["d1"], "the first run to start")
        assert await enqueue_async(once(), "d3") == first  # running still
        gates["d1"].set()
        await until_status(wf, first, "completed")
        gates["d4"] = anyio.Event()  # unfinished while d5 is enqueued: a worker would finish it at once
        third = await enqueue_async(once(), "d4")
        assert third != first
        assert await enqueue_async(once(), "d5") == third
        gates["d4"].set()
        await until_all(wf, [third])
    assert starts() == ["d1", "d4"]  # d2, d3 and d5 never became runs
    page = await list_runs_async(settings=wf)
    assert sorted(run.run_id for run in page.runs) == sorted([first, third])


# -- 8. bad input ------------------------------------------------------------------------------------------------------


def test_an_unknown_queue_is_refused_naming_the_known_ones(declare: Callable[..., Queue]) -> None:
    known = declare("known")
    with pytest.raises(ConfigurationError, match="no queue 'nope'") as refused:

        @workflow(queue="nope")
        async def nowhere() -> None: ...

    assert known.name in str(refused.value) and "default" in str(refused.value)
    # The refused definition claimed no workflow ID: a worker here would otherwise take its runs.
    assert not [ident for ident in registered_workflows() if "<locals>.nowhere@" in ident]
    with pytest.raises(ConfigurationError, match="no queue 'nope'") as refused:
        job.options(queue="nope")
    assert known.name in str(refused.value)
    with pytest.raises(ConfigurationError, match="no queue 'nope'"):
        Worker(queues=[known, "nope"])


@pytest.mark.parametrize("rate", ["100/fortnight", "0/s", "abc", "5/", "-1/s", ""])
def test_an_invalid_rate_is_refused_when_the_queue_is_declared(rate: str) -> None:
    name = f"t-bad-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigurationError, match=f"rate of queue '{name}'"):
        Queue(name, rate=rate)
    with pytest.raises(ConfigurationError, match=f"key_rate of queue '{name}'"):
        Queue(name, key_rate=rate)
    assert name not in {q.name for q in queues_registry.declared_queues()}  # nothing half-declared


@pytest.mark.parametrize(
    ("limits", "needle"),
    [
        ({"concurrency": 0}, "concurrency must be"),
        ({"concurrency": 2.5}, "concurrency must be"),
        ({"per_key": -1}, "per_key must be"),
        ({"per_key": True}, "per_key must be"),
        ({"partitions": 0}, "partitions must be 1 to"),
        ({"partitions": 1000}, "partitions must be 1 to"),
        ({"priority": 1}, "priority must be True or False"),
        ({"concurrency": 2, "partitions": 4}, "concurrency 2 cannot be split between 4 partitions"),
        ({"rate": "2/s", "partitions": 8}, "rate 2 cannot be split between 8 partitions"),
    ],
)
def test_invalid_limits_are_refused_naming_the_queue(limits: dict[str, Any], needle: str) -> None:
    name = f"t-bad-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigurationError, match=needle) as refused:
        Queue(name, **limits)
    assert repr(name) in str(refused.value)


@pytest.mark.parametrize(("limit", "partitions"), [(64, 8), (10, 4), (5, 3), (7, 7), (100, 16)])
def test_the_shares_of_a_partitioned_queue_add_up_to_its_limits(limit: int, partitions: int) -> None:
    queue = Queue(f"t-share-{uuid.uuid4().hex[:8]}", concurrency=limit, rate=f"{limit}/s", partitions=partitions)
    shares = [queue.config(p) for p in range(partitions)]
    assert sum(int(c["concurrency"]) for c in shares) == limit
    assert sum(int(c["rate"]) for c in shares) == limit
    assert min(int(c["concurrency"]) for c in shares) >= 1
    assert max(int(c["concurrency"]) for c in shares) - min(int(c["concurrency"]) for c in shares) <= 1


def test_bad_queue_names_and_a_limited_default_queue_are_refused() -> None:
    for name in ("", "has space", "x" * 65, "a{b}"):
        with pytest.raises(ConfigurationError, match="invalid queue name"):
            Queue(name)
    with pytest.raises(ConfigurationError, match="'default' queue has no limits"):
        Queue("default", concurrency=2)


def test_one_name_declared_twice_differently_in_a_process_is_refused(declare: Callable[..., Queue]) -> None:
    first = declare("twice", concurrency=2)
    assert queues_registry.queue_named(first.name) is first
    Queue(first.name, concurrency=2)  # the same declaration again (a module imported twice) is fine
    with pytest.raises(ConfigurationError, match="declared twice in this process") as refused:
        Queue(first.name, concurrency=3)
    assert f"Queue({first.name!r}, concurrency=2)" in str(refused.value)
    assert f"Queue({first.name!r}, concurrency=3)" in str(refused.value)


async def test_options_a_queue_cannot_take_are_refused(wf: Settings, declare: Callable[..., Queue]) -> None:
    plain = declare("noprio", concurrency=2)
    with pytest.raises(ConfigurationError, match=f"queue {plain.name!r} is declared without priority=True"):
        await enqueue_async(job.options(settings=wf, queue=plain, priority=1), "p")
    for priority in (-1, 10, True, 1.5):
        with pytest.raises(ConfigurationError, match="invalid priority"):
            job.options(priority=priority)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="either delay= or at=, not both"):
        job.options(delay="1s", at=datetime.now(UTC))
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        job.options(at=datetime.now())  # a naive datetime
    refused_here: list[dict[str, Any]] = [{"key": "k"}, {"priority": 1}, {"delay": 1.0}, {"at": time.time() + 1}]
    for option in [*refused_here, {"dedup": "d"}]:
        name = next(iter(option))
        with pytest.raises(ConfigurationError, match=f"{name}: options of enqueue") as refused:
            await start_async(job.options(settings=wf, **option), "s")
        assert "start() executes the run here" in str(refused.value)
    store = await open_store(wf)
    assert await store.client.zcard(store.runs_key) == 0  # nothing refused left a run behind


@workflow
async def fans_out(key: str) -> str:
    return await job.options(key=key)(f"child-{key}")


async def test_a_child_run_refuses_the_options_of_enqueue_naming_them(wf: Settings) -> None:
    """A child executes in its parent's process at once: a key there would silently do nothing."""
    with pytest.raises(ConfigurationError, match="key: options of enqueue") as refused:
        await start_async(fans_out.options(settings=wf, run_id="fan"), "acme")
    assert "executes in its parent's process" in str(refused.value)
    assert starts() == []  # the child never started
    assert await status(wf, "fan") == "failed"


async def test_a_queue_declared_differently_by_another_process_keeps_its_limits_and_both_are_named(
    wf: Settings, server: Server, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"t-shared-{uuid.uuid4().hex[:8]}"
    other = await anyio.run_process(
        [sys.executable, "-m", "tests.queue_flows", "declare", name, "2"], cwd=ROOT, env=server_env(server, prefix)
    )
    other_run = other.stdout.decode().strip()
    caplog.set_level(logging.ERROR, logger="werkfluss")
    here = Queue(name, concurrency=3)
    try:
        run_id = await enqueue_async(job.options(settings=wf, queue=here), "here")
        # The declaration in force is the other process's while it is renewed (for a minute after):
        # the run is enqueued, this one waits, and the conflict is logged, naming both.
        [error] = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
        assert f"Queue({name!r}, concurrency=3)" in error and f"Queue({name!r}, concurrency=2)" in error
        store = await open_store(wf)
        config = await store.queue_config(here.tags()[0])
        assert (config["concurrency"], config["declared"]) == ("2", f"Queue({name!r}, concurrency=2)")
        async with Worker(settings=wf, queues=[here]):
            await until_all(wf, [run_id, other_run])
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # logged once per process
    finally:
        queues_registry._QUEUES.pop(name, None)


async def test_a_script_without_logging_sees_a_conflicting_declaration_on_stderr(server: Server, prefix: str) -> None:
    """A deploy whose new limits do nothing yet must not pass unseen: werkfluss logs nothing by default."""
    name = f"t-warned-{uuid.uuid4().hex[:8]}"
    env = server_env(server, prefix)
    command = [sys.executable, "-m", "tests.queue_flows", "declare", name]
    first = await anyio.run_process([*command, "2"], cwd=ROOT, env=env)
    assert "QueueDeclarationWarning" not in first.stderr.decode()
    second = await anyio.run_process([*command, "3"], cwd=ROOT, env=env)
    warned = second.stderr.decode()
    assert "QueueDeclarationWarning" in warned, warned
    assert f"Queue({name!r}, concurrency=3)" in warned and f"Queue({name!r}, concurrency=2)" in warned


# -- 9. cancel while waiting for admission -----------------------------------------------------------------------------


async def test_a_run_cancelled_while_it_waits_for_a_slot_never_takes_one(
    wf: Settings, declare: Callable[..., Queue]
) -> None:
    one = declare("cancel", concurrency=1)
    tag = one.tags()[0]
    gates["first"] = anyio.Event()
    first = await enqueue_async(job.options(settings=wf, queue=one), "first")
    async with Worker(settings=wf, queues=[one]):
        await until(lambda: starts() == ["first"], "the first run to start")
        waiting = await enqueue_async(job.options(settings=wf, queue=one), "waiting")
        after = await enqueue_async(job.options(settings=wf, queue=one), "after")
        delayed = await enqueue_async(job.options(settings=wf, queue=one, delay=0.3), "delayed")
        assert await waiting_for_admission(wf, one, waiting)
        assert (await get_run_async(waiting, settings=wf)).waiting_on == f"concurrency of {one.name} (1/1)"
        assert await cancel_async(waiting, "not needed", settings=wf)
        assert await cancel_async(delayed, "not needed", settings=wf)
        assert not await waiting_for_admission(wf, one, waiting)
        store = await open_store(wf)
        assert not await store.client.zscore(store.queue_key(DELAYED, tag), delayed)
        gates["first"].set()
        # Due after the cancelled delayed run: by the time it ran, that one would have been moved too.
        control = await enqueue_async(job.options(settings=wf, queue=one, delay=0.5), "control")
        await until_all(wf, [first, after, control])
    assert starts() == ["first", "after", "control"]
    assert await status(wf, waiting) == "cancelled" and await status(wf, delayed) == "cancelled"
    assert await slots_held(wf, tag) == 0
    assert not await store.client.hexists(store.queue_key(META, tag), waiting)  # forgotten by the queue


# -- 10. partitions ----------------------------------------------------------------------------------------------------


async def test_a_partitioned_queue_keeps_a_key_on_one_partition_and_its_per_key_limit_exact(
    wf: Settings, declare: Callable[..., Queue]
) -> None:
    spread = declare("parts", partitions=4, per_key=1)
    keys = [f"tenant{i}" for i in range(8)]
    ids: dict[str, list[str]] = {key: [] for key in keys}
    for n in range(24):
        key = keys[n % 8]
        ids[key].append(await enqueue_async(job.options(settings=wf, queue=spread, key=key), f"p{n}", key, 0.02))
    store = await open_store(wf)
    tags: dict[str, set[str]] = {}
    for key, runs in ids.items():
        tags[key] = {(await store.state(run)).queue for run in runs}
        assert tags[key] == {spread.tag_for(key, runs[0])}  # every run of a key on its key's partition
    used = set().union(*tags.values())
    assert len(used) >= 2 and used <= set(spread.tags())
    async with Worker(settings=wf, concurrency=16, queues=[spread]):
        await until_all(wf, [run for runs in ids.values() for run in runs])
    assert all(most[key] == 1 for key in keys)
    assert most["*"] > 1  # keys on several partitions executed at once
    for tag in spread.tags():
        assert await slots_held(wf, tag) == 0
