"""Workers on the queue, in this process and as real processes killed with SIGKILL and SIGSTOP."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest

from werkfluss import RetryPolicy, Settings, Worker, enqueue_async, step, workflow
from werkfluss._events import RunResumed, StepCompleted, encode_event
from werkfluss._holder import holder_is_dead, holder_prefix
from werkfluss._store._open import close_stores, open_store

from . import worker_flows
from .conftest import ROOT, wait_for
from .helpers import events as log_of
from .helpers import statuses, until_all
from .servers import RedisProcess, require_binary
from .workers import Workers, server_env

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .conftest import Server

pytestmark = pytest.mark.slow


@pytest.fixture
def wf(wf: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("WF_LEDGER", str(tmp_path / "ledger"))
    return Settings(
        redis_url=wf.redis_url, directory=wf.directory, prefix=wf.prefix, lease=1.0
    )  # a short lease: claims and takeovers happen within the test's patience


def ledger(path: Path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        key, pid, started = line.split()
        rows.append((key, int(pid), float(started)))
    return rows


# --- in this process ----------------------------------------------------------------------------------------------


async def test_enqueued_runs_are_served_and_enqueueing_a_call_twice_reaches_one_run(wf: Settings) -> None:
    ids = [await enqueue_async(worker_flows.five.options(settings=wf), n) for n in range(10)]
    assert await enqueue_async(worker_flows.five.options(settings=wf), 3) == ids[3]
    async with Worker(settings=wf, concurrency=4):
        await until_all(wf, ids)
    store = await open_store(wf)
    for n, run_id in enumerate(ids):
        state = await store.state(run_id)
        assert state.result == msgspec.msgpack.encode(worker_flows.expected_five(n))
    executed = Counter(key for key, _, _ in ledger(Path(os.environ["WF_LEDGER"])))
    assert len(executed) == 50 and set(executed.values()) == {1}  # every step once, the duplicate enqueue too


@workflow(name="tests.only-here:unknown")
async def not_in_workers() -> None:
    return None


async def test_messages_no_worker_can_serve_go_to_the_dead_letters_with_their_reason(wf: Settings) -> None:
    store = await open_store(wf)
    await store.ensure_group("workers")
    await store.client.xadd(store.queue_key("queue"), {"junk": "1"})  # no run ID at all
    await store.client.xadd(store.queue_key("queue"), {"r": "no-such-run"})
    unknown = await enqueue_async(not_in_workers.options(settings=wf, run_id="unknown-wf"))
    healthy = await enqueue_async(worker_flows.five.options(settings=wf), 100)
    from werkfluss import _ids

    hidden = _ids._registry.pop(not_in_workers.id)  # this worker does not define it
    try:
        async with Worker(settings=wf, max_deliveries=2):
            await until_all(wf, [healthy])
            with anyio.fail_after(20):
                while len(await store.dead_letters(10)) < 3:
                    await anyio.sleep(0.05)
    finally:
        _ids._registry[not_in_workers.id] = hidden
    reasons = {fields["r"]: fields["reason"] for _, fields in await store.dead_letters(10)}
    assert "malformed message" in reasons[""]
    assert "there is no run 'no-such-run'" in reasons["no-such-run"]
    assert "delivered 2 times" in reasons[unknown] and "tests.only-here:unknown" in reasons[unknown]
    # Its run is failed with the reason, not left looking in progress.
    with anyio.fail_after(10):
        while await store.status(unknown) != "failed":
            await anyio.sleep(0.02)
    assert b"is not defined in worker" in ((await store.state(unknown)).error or b"")
    # Re-driven with the workflow defined again, it runs.
    dead_id = next(i for i, fields in await store.dead_letters(10) if fields["r"] == unknown)
    assert await store.redrive(dead_id)
    async with Worker(settings=wf):
        await until_all(wf, [unknown])


async def test_due_timers_resume_each_run_once_with_several_workers_polling(wf: Settings) -> None:
    ids = [await enqueue_async(worker_flows.nap_then_add.options(settings=wf), n, 0.5) for n in range(20)]
    fast = msgspec.structs.replace(wf, hold=0.05)  # pause instead of holding the run in memory
    async with Worker(settings=fast), Worker(settings=fast), Worker(settings=fast):
        await until_all(wf, ids)
    for run_id in ids:
        resumes = [e for e in await log_of(wf, run_id) if isinstance(e, RunResumed)]
        assert len(resumes) == 2, run_id  # from the queue, then once when the timer came due


async def test_stopping_a_worker_hands_unfinished_runs_back_at_a_step_boundary(wf: Settings) -> None:
    os.environ["WF_STEP_DELAY"] = "0.3"
    try:
        ids = [await enqueue_async(worker_flows.five.options(settings=wf), n) for n in range(200, 204)]
        worker = Worker(settings=wf, grace=5)
        async with worker:
            wait_until = time.monotonic() + 10
            while not ledger(Path(os.environ["WF_LEDGER"])) and time.monotonic() < wait_until:
                await anyio.sleep(0.01)
        # The block ended: runs stopped after their current step, handed back to the queue.
        assert (await statuses(wf, ids))["completed"] == 0
        async with Worker(settings=wf):
            await until_all(wf, ids)
    finally:
        del os.environ["WF_STEP_DELAY"]
    executed = Counter(key for key, _, _ in ledger(Path(os.environ["WF_LEDGER"])))
    assert set(executed.values()) == {1}  # the step running at shutdown finished and was recorded


async def test_a_stop_now_says_once_that_runs_are_handed_back(wf: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="werkfluss")
    os.environ["WF_STEP_DELAY"] = "5"
    try:
        run_id = await enqueue_async(worker_flows.five.options(settings=wf), 300)
        worker = Worker(settings=wf, grace=10)
        store = await open_store(wf)
        async with worker:
            with anyio.fail_after(10):
                while await store.status(run_id) != "running":
                    await anyio.sleep(0.01)
            worker.stop()
            worker.stop(now=True)  # a second Ctrl-C: no grace
    finally:
        del os.environ["WF_STEP_DELAY"]
    messages = [r.getMessage() for r in caplog.records if r.name == "werkfluss"]
    assert any("stopping now: 1 runs are handed back unfinished" in m for m in messages), messages
    assert not [m for m in messages if "did not stop within" in m]  # it did not wait out the grace


async def test_a_graceful_stop_lets_a_parallel_step_finish_while_a_sibling_retries(wf: Settings) -> None:
    # Found by the differential fuzzer: the retrying sibling's checkpoint saw the
    # shutdown and cancelled the whole body, so the step still executing in
    # parallel ran again on the next worker.
    running, release = anyio.Event(), anyio.Event()
    runs: Counter[str] = Counter()

    @step(retries=RetryPolicy(retries=2, base=0.05))
    async def flaky() -> str:
        runs["flaky"] += 1
        if runs["flaky"] == 1:
            raise RuntimeError("first attempt fails")
        return "flaky"

    @step
    async def slow() -> str:
        runs["slow"] += 1
        running.set()
        await release.wait()
        return "slow"

    @workflow
    async def pair() -> list[str]:
        return list(await asyncio.gather(flaky(), slow()))

    run_id = await enqueue_async(pair.options(settings=wf, run_id="graceful-pair"))
    async with Worker(settings=wf, grace=10) as first:
        with anyio.fail_after(20):
            await running.wait()
        first.stop()
        await anyio.sleep(0.2)  # the sibling's retry (0.05 s) reaches its checkpoint while slow() runs
        release.set()
    async with Worker(settings=wf):
        await until_all(wf, [run_id])
    assert runs["slow"] == 1  # finished on the first worker and recorded, not executed again
    assert [e.step for e in await log_of(wf, run_id) if isinstance(e, StepCompleted)].count(slow.id) == 1


async def test_a_worker_takes_over_at_once_from_a_caller_here_that_left_without_handing_back(wf: Settings) -> None:
    # A caller whose acquire was cancelled on its way back (a worker shutting down
    # mid-read) holds the run under a name nobody here uses any more. The lease is
    # no help: this process's holders count as busy past it. It must be taken over.
    run_id = await enqueue_async(worker_flows.five.options(settings=wf, run_id="orphaned"), 7)
    store = await open_store(wf)
    gone = holder_prefix() + "999999"
    got = await store.acquire(
        run_id, workflow="", holder=gone, lease=3600, started=b"", resumed=encode_event(RunResumed(time.time(), gone))
    )
    assert got.kind == "resumed" and holder_is_dead(gone)
    await store.enqueue(run_id)
    started = time.monotonic()
    async with Worker(settings=wf):
        await until_all(wf, [run_id], timeout=30)
    assert time.monotonic() - started < 20  # not the hour-long lease
    resumed = [e.holder for e in await log_of(wf, run_id) if isinstance(e, RunResumed)]
    assert resumed[0] == gone and len(resumed) >= 2


# --- real processes -----------------------------------------------------------------------------------------------


@pytest.fixture
def workers(server: Server, prefix: str, tmp_path: Path) -> Iterator[Workers]:
    env = server_env(server, prefix, WERKFLUSS_LEASE="1.0", WF_LEDGER=str(tmp_path / "ledger"))
    group = Workers(env, tmp_path)
    yield group
    group.stop_all()


async def test_a_step_that_calls_sys_exit_fails_its_attempt_and_its_worker_serves_on(
    workers: Workers, settings: Settings, tmp_path: Path
) -> None:
    # SystemExit is no Exception: raised on, it killed every worker that took the run,
    # whose message was handed on to the next worker, and the run never failed.
    worker = workers.start()
    caught = await enqueue_async(worker_flows.exits.options(settings=settings, run_id="exit-caught"), 3, True)
    uncaught = await enqueue_async(worker_flows.exits.options(settings=settings, run_id="exit-uncaught"), 4, False)
    body = await enqueue_async(worker_flows.quits.options(settings=settings, run_id="exit-in-body"), 5)
    healthy = [await enqueue_async(worker_flows.five.options(settings=settings), n) for n in range(5)]
    await until_all(settings, healthy, timeout=60)
    await until_all(settings, [uncaught, body], "failed", timeout=60)
    await until_all(settings, [caught], timeout=60)
    assert worker.poll() is None, workers.log(worker)
    store = await open_store(settings)
    assert msgspec.msgpack.decode((await store.state(caught)).result or b"") == "caught SystemExit: 3"
    error = msgspec.msgpack.decode((await store.state(uncaught)).error or b"")
    assert "SystemExit" in str(error)
    assert "SystemExit" in str(msgspec.msgpack.decode((await store.state(body)).error or b""))
    executions = Counter(key.rsplit(":", 1)[0] for key, _, _ in ledger(tmp_path / "ledger"))
    # One attempt each: not retried, not re-run by a worker that died of it.
    assert executions[caught] == 1 and executions[uncaught] == 1 and executions[body] == 1
    assert worker.poll() is None, workers.log(worker)


async def test_a_worker_that_does_not_define_a_workflow_leaves_its_runs_to_one_that_does(
    workers: Workers, settings: Settings
) -> None:
    # The one without it took its share of the messages, left them pending, and claimed
    # them back itself once idle past the lease, each time counting a delivery: with a
    # worker that defines the workflow idle beside it, runs went to the dead letters.
    from . import shop_flows

    args = ("--max-deliveries", "2")
    without = workers.start(*args)  # serves tests.worker_flows: no shop.checkout
    workers.module = "tests.shop_flows"
    defining = workers.start(*args)
    ids = [await enqueue_async(shop_flows.checkout.options(settings=settings, run_id=f"left-{n}"), f"o{n}")
           for n in range(8)]  # fmt: skip
    await until_all(settings, ids, "paused", timeout=60)  # each ran up to its hook, on the worker that defines it
    store = await open_store(settings)
    assert await store.dead_letters(10) == []
    assert without.poll() is None and defining.poll() is None
    for run_id in ids:
        resumed = [e.holder for e in await log_of(settings, run_id) if isinstance(e, RunResumed)]
        assert f"/{defining.pid}/" in resumed[-1], resumed


def check_exactly_once(killed: set[int], logs: dict[str, list[Any]], rows: list[tuple[str, int, float]]) -> None:
    """Every step completed once; every extra execution was in flight in a killed worker."""
    completed: dict[str, float] = {}
    for run_id, events in logs.items():
        steps = [e for e in events if isinstance(e, StepCompleted)]
        assert sorted(e.seq for e in steps) == [1, 2, 3, 4, 5], run_id
        completed.update({f"{run_id}:{e.seq}": e.time for e in steps})
    executions: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for key, pid, started in rows:
        executions[key].append((pid, started))
    assert set(executions) == set(completed)
    for key, runs in executions.items():
        *earlier, _ = sorted(runs, key=lambda r: r[1])
        for pid, started in earlier:
            assert pid in killed, (key, runs)
            assert started < completed[key]


async def test_three_workers_300_runs_two_kills_every_step_completed_exactly_once(
    workers: Workers, settings: Settings, tmp_path: Path
) -> None:
    fast = Settings(redis_url=settings.redis_url, directory=settings.directory, prefix=settings.prefix, lease=1.0)
    os.environ["WF_STEP_DELAY"] = "0.05"
    workers.env["WF_STEP_DELAY"] = "0.05"
    try:
        for _ in range(3):
            workers.start()
        ids = [await enqueue_async(worker_flows.five.options(settings=fast), n) for n in range(300)]
        rng = random.Random(7)
        for low, high in ((200, 500), (800, 1100)):  # of 1500 step executions: kills land mid-flight
            target = rng.randint(low, high)
            with anyio.fail_after(60):
                while len(ledger(tmp_path / "ledger")) < target:
                    await anyio.sleep(0.01)
            victim = rng.choice([p for p in workers.procs if p.poll() is None])
            workers.kill(victim)
            workers.start()
        await until_all(fast, ids, timeout=120)
    finally:
        del os.environ["WF_STEP_DELAY"]
    store = await open_store(fast)
    for n, run_id in enumerate(ids):
        assert await store.status(run_id) == "completed"
        assert (await store.state(run_id)).result == msgspec.msgpack.encode(worker_flows.expected_five(n))
    logs = {run_id: await log_of(fast, run_id) for run_id in ids}
    rows = ledger(tmp_path / "ledger")
    check_exactly_once(workers.killed, logs, rows)
    extra = len(rows) - 1500
    # At most what two killed workers had in flight: their slots, and the runs they took over from
    # the first victim (suspects run beside the slots, and go on there once trusted).
    assert extra <= 4 * workers.concurrency, extra
    await close_stores()


async def test_a_stalled_worker_cannot_write_to_a_run_another_worker_took_over(
    workers: Workers, settings: Settings, tmp_path: Path
) -> None:
    fast = Settings(redis_url=settings.redis_url, directory=settings.directory, prefix=settings.prefix, lease=1.0)
    workers.env["WF_STEP_DELAY"] = "2.5"
    stalled = workers.start()
    run_id = await enqueue_async(worker_flows.five.options(settings=fast, run_id="stall"), 1)
    wait_for(lambda: len(ledger(tmp_path / "ledger")) == 1, what="the first worker to start the step")
    stalled.send_signal(signal.SIGSTOP)  # past its lease: it renews nothing, writes nothing
    workers.start()
    with anyio.fail_after(30):
        while not [
            e for e in await log_of(fast, run_id) if isinstance(e, RunResumed) and f"/{stalled.pid}/" not in e.holder
        ]:
            await anyio.sleep(0.02)
    stalled.send_signal(signal.SIGCONT)  # it wakes inside the step and tries to record it
    await until_all(fast, [run_id], timeout=60)
    events = await log_of(fast, run_id)
    steps = [e for e in events if isinstance(e, StepCompleted)]
    assert sorted(e.seq for e in steps) == [1, 2, 3, 4, 5]
    first = [row for row in ledger(tmp_path / "ledger") if row[0] == f"{run_id}:1"]
    assert len(first) == 2 and first[0][1] == stalled.pid  # both executed step 1; one completion recorded
    assert stalled.poll() is None  # the stale worker survived, and dropped the run
    await close_stores()


async def test_a_redis_restart_mid_run_loses_no_completed_step_and_every_run_completes(
    tmp_path: Path, prefix: str
) -> None:
    require_binary("redis-server")
    with RedisProcess(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always") as redis_proc:
        env = {
            **os.environ, "WERKFLUSS_REDIS_URL": redis_proc.url, "WERKFLUSS_PREFIX": prefix,
            "WERKFLUSS_LEASE": "1.0", "PYTHONPATH": str(ROOT), "WF_LEDGER": str(tmp_path / "ledger"),
            "WF_STEP_DELAY": "0.05",
        }  # fmt: skip
        env.pop("WERKFLUSS_DIR", None)
        group = Workers(env, tmp_path)
        settings = Settings(redis_url=redis_proc.url, prefix=prefix, lease=1.0)
        try:
            group.start()
            group.start()
            ids = [await enqueue_async(worker_flows.five.options(settings=settings), n) for n in range(40)]
            await close_stores()
            wait_for(lambda: len(ledger(tmp_path / "ledger")) >= 60, what="progress before the restart")
            redis_proc.kill()
            redis_proc.restart()
            await until_all(settings, ids, timeout=90)
            logs = {run_id: await log_of(settings, run_id) for run_id in ids}
        finally:
            group.stop_all()
            await close_stores()
    completed = {f"{r}:{e.seq}": e.time for r, ev in logs.items() for e in ev if isinstance(e, StepCompleted)}
    assert len(completed) == 200
    for key, _, started in ledger(tmp_path / "ledger"):
        assert started < completed[key], f"{key} executed again after its completion was recorded"


SLEEPER = """
import sys
from werkfluss import Settings, start
from tests import worker_flows
print(start(worker_flows.nap_then_add.options(run_id="sleeper", settings=Settings.from_env(hold=0.05)), 5, 1.5))
"""


async def test_a_timer_fires_after_every_process_that_knew_of_it_died(
    wf: Settings, run_script: Any, tmp_path: Path
) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    proc = run_script(script, env={"WERKFLUSS_LEASE": "1.0"})
    store = await open_store(wf)
    with anyio.fail_after(20):
        while await store.status("sleeper") != "paused":
            await anyio.sleep(0.02)
    proc.kill()  # the only process that knew about the run is gone
    proc.communicate()
    async with Worker(settings=wf):
        await until_all(wf, ["sleeper"])
    assert (await store.state("sleeper")).result == msgspec.msgpack.encode(6)
    keys = Counter(key for key, _, _ in ledger(tmp_path.parent / tmp_path.name / "ledger"))
    assert keys == {"sleeper:1": 1, "sleeper:3": 1}  # the first step was not executed again
