"""`werkfluss.testing.TestClock`: workflows that sleep for days, tested in milliseconds on real servers."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import anyio
import msgspec
import pytest

from werkfluss import (
    ConfigurationError,
    RunTimeoutError,
    Schedule,
    Settings,
    Worker,
    enqueue_async,
    hook,
    invoke_hook,
    invoke_hook_async,
    list_schedules_async,
    sleep,
    sleep_until,
    start,
    start_async,
    step,
    workflow,
)
from werkfluss import _schedules as schedules_registry
from werkfluss._clock import installed, skew
from werkfluss._events import RunPaused, TimerStarted
from werkfluss._store._keys import TIMERS
from werkfluss._store._open import open_store
from werkfluss.testing import TestClock, check_replay_async

from .helpers import events, every_server, status, until_status  # noqa: F401

ran: list[str] = []
gates: dict[str, asyncio.Event] = {}
RESET = (ran, gates)  # What conftest's `wf` clears before each test.

WEEK = 7 * 86400.0
SLACK = timedelta(minutes=1)  # the real time a test takes: skipped time is the wait less what really passed


@pytest.fixture
def wf(wf: Settings) -> Settings:
    # The hold, how near a timer waits in memory instead of pausing the run, as a user has it (2 s).
    return msgspec.structs.replace(wf, hold=2.0)


@step
async def mark(label: str) -> str:
    ran.append(label)
    return label


@step
async def held(name: str) -> str:
    """A step that executes until the test opens its gate."""
    ran.append(f"{name} entered")
    await gates.setdefault(name, asyncio.Event()).wait()
    ran.append(f"{name} done")
    return name


@workflow
async def onboarding(user: str) -> str:
    await mark("signed up")
    await sleep("7d")
    await mark("reminded")
    answer = await hook(f"answer-{user}")
    await sleep("1d")
    await sleep(1.5)  # within the hold: waited in memory, not paused, and skipped as well
    await mark("followed up")
    return f"done: {answer}"


@workflow
async def nap_week() -> str:
    await sleep("7d")
    return "rested"


@workflow
async def until(moment: datetime) -> str:
    await sleep_until(moment)
    return "woke"


@step
async def today() -> float:
    return time.time()


@workflow
async def week_apart() -> list[float]:
    first = await today()
    await sleep("7d")
    return [first, await today()]


@workflow
async def hold_then(name: str) -> str:
    return await held(name)


@workflow
async def later(label: str, duration: str) -> str:
    await sleep(duration)
    return await mark(label)


@workflow(deadline="2h")
async def answer_in_time(user: str) -> str:
    answer: str = await hook(f"late-{user}")
    return answer


@workflow(name="test_clock.hourly")
async def hourly(at: datetime) -> str:
    return await mark(at.isoformat())


def elapsed_since(began: float, what: str) -> float:
    seconds = time.monotonic() - began
    print(f"\n{what}: {seconds * 1000:.0f} ms of real time")
    return seconds


async def when_waiting_on_hook(settings: Settings, run_id: str) -> None:
    """Wait until the run is paused on its hook (its pause records that it waits for one)."""
    with anyio.fail_after(10):
        while True:
            if await status(settings, run_id) == "paused":
                pauses = [e for e in await events(settings, run_id) if isinstance(e, RunPaused)]
                if pauses and pauses[-1].waits[0].kind == "hook":
                    return
            await anyio.sleep(0.01)


async def timer_dues(settings: Settings, run_id: str) -> list[float]:
    return [e.due for e in await events(settings, run_id) if isinstance(e, TimerStarted)]


# -- auto mode ----------------------------------------------------------------------------


async def test_seven_days_a_hook_and_a_day_end_to_end_in_under_a_second_with_start(wf: Settings) -> None:
    began, wall = time.monotonic(), time.time()
    async with TestClock(wf) as clock:
        task = asyncio.create_task(start_async(onboarding.options(settings=wf, run_id="u1"), "u1"))
        await when_waiting_on_hook(wf, "u1")
        # Only a hook is awaited now: nothing is due, so auto mode must not move the clock.
        waited_at = clock.skipped
        assert waited_at >= timedelta(days=7) - SLACK
        await anyio.sleep(0.2)  # ~40 looks by the clock: none may jump
        assert clock.skipped == waited_at and ran == ["signed up", "reminded"]
        await invoke_hook_async("answer-u1", "yes", settings=wf)
        assert await task == "done: yes"
        skipped = clock.skipped
    seconds = elapsed_since(began, "7 days, a hook, 1 day and 1.5 s")
    assert seconds < 5
    assert ran == ["signed up", "reminded", "followed up"]
    assert skipped >= timedelta(days=8, seconds=1.5) - SLACK
    # The due times were recorded on the test clock: a week (and a day more) ahead of the real one.
    first, second, third = await timer_dues(wf, "u1")
    assert wall + WEEK <= first < wall + WEEK + 60
    assert second >= first + 86400 and third >= second + 1.5
    assert not installed(wf.prefix) and skew(wf.prefix) == 0.0


async def test_seven_days_and_a_hook_through_a_worker(wf: Settings) -> None:
    began, wall = time.monotonic(), time.time()
    async with TestClock(wf), Worker(settings=wf):
        run_id = await enqueue_async(onboarding.options(settings=wf, run_id="w1"), "w1")
        await when_waiting_on_hook(wf, run_id)
        await invoke_hook_async("answer-w1", "ok", settings=wf)
        await until_status(wf, run_id, "completed")
    seconds = elapsed_since(began, "the same through a Worker and enqueue")
    assert seconds < 5
    assert ran == ["signed up", "reminded", "followed up"]
    assert (await timer_dues(wf, run_id))[0] >= wall + WEEK


def test_a_blocking_start_skips_a_week(settings: Settings) -> None:
    began = time.monotonic()
    with TestClock(settings) as clock:
        assert start(nap_week.options(settings=settings, run_id="sync")) == "rested"
        assert clock.skipped >= timedelta(days=7) - SLACK
    assert elapsed_since(began, "a blocking start() of a week's sleep") < 5


def test_a_blocking_start_with_a_hook_delivered_from_another_thread(settings: Settings) -> None:
    def answer() -> None:
        anyio.run(when_waiting_on_hook, settings, "sync-hook")
        invoke_hook("answer-s1", "fine", settings=settings)

    helper = threading.Thread(target=answer)
    began = time.monotonic()
    with TestClock(settings):
        helper.start()
        assert start(onboarding.options(settings=settings, run_id="sync-hook"), "s1") == "done: fine"
    helper.join(10)
    assert elapsed_since(began, "a blocking start() of 7 days, a hook and a day") < 5


async def test_auto_mode_does_not_skip_while_a_step_executes(wf: Settings) -> None:
    """Run A's step executes until the test lets it end; meanwhile run B's timer is due in an hour.
    B must not wake before A's step is done: the order of the marks says which came first."""
    async with TestClock(wf) as clock:
        a = asyncio.create_task(start_async(hold_then.options(settings=wf, run_id="a"), "a"))
        with anyio.fail_after(10):
            while "a entered" not in ran:
                await anyio.sleep(0.005)
        b = asyncio.create_task(start_async(later.options(settings=wf, run_id="b"), "b woke", "1h"))
        await until_status(wf, "b", "paused")
        await anyio.sleep(0.2)  # ~40 looks by the clock, with a timer due and a step executing
        assert clock.skipped == timedelta(0) and await status(wf, "b") == "paused"
        gates["a"].set()
        assert await a == "a" and await b == "b woke"
        assert clock.skipped >= timedelta(hours=1) - SLACK
    assert ran == ["a entered", "a done", "b woke"]


async def test_a_delayed_start_waits_for_auto_mode_too(wf: Settings) -> None:
    async with TestClock(wf), Worker(settings=wf):
        run_id = await enqueue_async(later.options(settings=wf, run_id="d", delay="1d"), "delayed", "0s")
        await until_status(wf, run_id, "completed")
    assert ran == ["delayed"]


async def test_auto_mode_skips_to_a_deadline_when_a_hook_waits_for_longer(wf: Settings) -> None:
    began = time.monotonic()
    async with TestClock(wf) as clock:
        with pytest.raises(RunTimeoutError, match="deadline 2h"):
            await start_async(answer_in_time.options(settings=wf, run_id="late"), "u")
        assert clock.skipped >= timedelta(hours=2) - SLACK
    assert elapsed_since(began, "a hook outwaited by its run's 2 h deadline") < 5


async def test_the_fixture_skips(werkfluss_clock: TestClock) -> None:
    assert werkfluss_clock.auto
    assert await start_async(nap_week.options(run_id="fixture")) == "rested"
    assert werkfluss_clock.skipped >= timedelta(days=7) - SLACK


# -- manual mode --------------------------------------------------------------------------


async def test_manual_mode_moves_only_when_advanced(wf: Settings) -> None:
    async with TestClock(wf, auto=False) as clock, Worker(settings=wf):
        run_id = await enqueue_async(later.options(settings=wf, run_id="m"), "a week later", "7d")
        await until_status(wf, run_id, "paused")
        clock.advance("6d")  # not yet due
        await anyio.sleep(0.2)  # the workers were nudged: a timer due now would have moved by now
        assert await status(wf, run_id) == "paused" and ran == []
        before = clock.now()
        after = clock.advance(timedelta(days=1))
        assert timedelta(days=1) <= after - before < timedelta(days=1, seconds=5)
        await until_status(wf, run_id, "completed", timeout=5)
    assert ran == ["a week later"]


async def test_sleep_until_a_moment_three_days_ahead_on_the_test_clock(wf: Settings) -> None:
    async with TestClock(wf, auto=False) as clock:
        moment = clock.now() + timedelta(days=3)
        task = asyncio.create_task(start_async(until.options(settings=wf, run_id="u"), moment))
        await until_status(wf, "u", "paused")
        assert await timer_dues(wf, "u") == [moment.timestamp()]
        assert clock.advance_to(moment) >= moment
        with anyio.fail_after(5):
            assert await task == "woke"


async def test_a_delayed_start_fires_after_an_advance(wf: Settings) -> None:
    async with TestClock(wf, auto=False) as clock, Worker(settings=wf):
        run_id = await enqueue_async(later.options(settings=wf, run_id="late", delay="1d"), "started", "0s")
        assert await status(wf, run_id) == "pending"
        clock.advance("1d")
        await until_status(wf, run_id, "completed", timeout=5)
    assert ran == ["started"]


async def test_next_timer_jumps_to_a_paused_runs_timer_not_to_a_watchdog(wf: Settings) -> None:
    async with TestClock(wf, auto=False) as clock:
        assert clock.next_timer() is None  # nothing waits
        before = clock.time()
        task = asyncio.create_task(start_async(later.options(settings=wf, run_id="n"), "five hours on", "5h"))
        await until_status(wf, "n", "paused")
        [due] = await timer_dues(wf, "n")
        moved = clock.next_timer()
        # Within the ms the timer set keeps due times in: the run wakes either way.
        assert moved is not None and moved.timestamp() >= due - 0.001 and due >= before + 5 * 3600
        with anyio.fail_after(5):
            assert await task == "five hours on"
        # The run ended: nothing is left to jump to (its watchdog was removed with it).
        store = await open_store(wf)
        assert clock.next_timer() is None, await store.client.zrange(store.queue_key(TIMERS), 0, -1, withscores=True)


async def test_a_replay_after_the_clock_is_restored_returns_the_recorded_values(wf: Settings) -> None:
    async with TestClock(wf):
        recorded = await start_async(week_apart.options(settings=wf, run_id="r"))
    assert recorded[1] - recorded[0] < 60  # real time between the steps; the week was the test clock's
    [due] = await timer_dues(wf, "r")
    assert due > time.time() + WEEK - 60  # a week ahead of the real clock, now restored
    began = time.monotonic()
    assert await start_async(week_apart.options(settings=wf, run_id="r")) == recorded
    check = await check_replay_async(week_apart, "r", settings=wf)
    assert check.ok and check.replayed == 3
    assert elapsed_since(began, "the attach and the replay check") < 5


async def test_next_tick_drives_a_schedule_tick_by_tick(wf: Settings) -> None:
    declared = Schedule(f"t-{uuid.uuid4().hex[:8]}", hourly, every="1h")
    try:
        async with TestClock(wf, auto=False) as clock, Worker(settings=wf):
            with anyio.fail_after(10):
                while declared.name not in [s.name for s in await list_schedules_async(settings=wf)]:
                    await anyio.sleep(0.01)
            first = clock.next_tick(declared.name)
            assert first is not None and first.minute == first.second == 0 and first <= clock.now()
            await until_status(wf, declared.run_id(int(first.timestamp() * 1000)), "completed", timeout=5)
            second = clock.next_tick(declared.name)
            assert second == first + timedelta(hours=1)
            await until_status(wf, declared.run_id(int(second.timestamp() * 1000)), "completed", timeout=5)
        assert ran == [first.isoformat(), second.isoformat()]  # one run per tick, with its tick
        with pytest.raises(ConfigurationError, match="no schedule 'nope'"):
            clock.next_tick("nope")
    finally:
        schedules_registry._SCHEDULES.pop(declared.name, None)  # later workers must not serve it


# -- bad input ------------------------------------------------------------------------------


def test_bad_input_is_refused_naming_it(settings: Settings) -> None:
    with pytest.raises(ConfigurationError, match="quiet"):
        TestClock(settings, quiet=-1)
    with pytest.raises(ConfigurationError, match="naive"):
        TestClock(settings, at=datetime(2030, 1, 1))
    clock = TestClock(settings, auto=False)
    with pytest.raises(ConfigurationError, match="not installed"):
        clock.advance("1h")
    with clock:
        with pytest.raises(ConfigurationError, match="already runs the clock"), TestClock(settings):
            pass
        with pytest.raises(ConfigurationError, match="test clock advance"):
            clock.advance("-1s")
        with pytest.raises(ConfigurationError, match="forward only"):
            clock.advance_to(clock.now() - timedelta(minutes=1))
        with pytest.raises(ConfigurationError, match="naive"):
            clock.advance_to(datetime(2030, 1, 1))
    with (
        pytest.raises(ConfigurationError, match="forward only"),
        TestClock(settings, at=datetime(2001, 1, 1, tzinfo=UTC)),
    ):
        pass
    assert not installed(settings.prefix)


def test_at_starts_the_clock_at_a_moment(settings: Settings) -> None:
    moment = datetime(2031, 3, 30, 1, 30, tzinfo=UTC)
    with TestClock(settings, at=moment, auto=False) as clock:
        assert moment <= clock.now() < moment + timedelta(seconds=5)


def test_a_clock_left_can_be_installed_again_from_the_servers_time(settings: Settings) -> None:
    clock = TestClock(settings, auto=False)
    with clock:
        clock.advance("1h")
    assert clock.skipped == timedelta(hours=1) and not installed(settings.prefix)
    with clock:
        assert clock.skipped == timedelta(0)
        assert abs(clock.time() - time.time()) < 60  # the server's clock again, on a fresh connection
        clock.advance("1m")
    assert clock.skipped == timedelta(minutes=1)
