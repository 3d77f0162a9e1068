"""`sleep_until`: a durable sleep until a moment, recorded once; and the timer clock a test clock moves."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import anyio
import msgspec
import pytest

from werkfluss import ConfigurationError, Settings, hook, race, sleep, sleep_until, start_async, step, workflow
from werkfluss._clock import advance, set_skew
from werkfluss._events import RunPaused, TimerStarted

from .helpers import events, until_status

ran: list[str] = []
RESET = (ran,)  # What conftest's `wf` clears before each test.


@pytest.fixture
def wf(wf: Settings) -> Settings:
    # Timers this far off pause the run instead of waiting in memory; tests keep them short.
    return msgspec.structs.replace(wf, hold=0.05)


@step
async def mark(label: str) -> str:
    ran.append(label)
    return label


@workflow
async def wait_until(moment: datetime) -> str:
    await mark("before")
    await sleep_until(moment)
    await mark("after")
    return "woke"


@workflow
async def wait_from_now(seconds: float) -> str:
    # A moment computed from the clock: a replay computes another one, and gets the recorded one back.
    moment = datetime.now(ZoneInfo("Europe/Berlin")) + timedelta(seconds=seconds)
    woke = await sleep_until(moment)
    return await mark(f"woke {woke.isoformat()}")


async def test_sleep_until_pauses_the_run_until_the_moment(wf: Settings) -> None:
    moment = datetime.now(ZoneInfo("Europe/Berlin")) + timedelta(seconds=0.4)
    assert await start_async(wait_until.options(settings=wf, run_id="until"), moment) == "woke"
    assert time.time() >= moment.timestamp()
    log = await events(wf, "until")
    [timer] = [e for e in log if isinstance(e, TimerStarted)]
    assert timer.due == pytest.approx(moment.timestamp(), abs=1e-6)  # the moment itself, not now + something
    paused = next(e for e in log if isinstance(e, RunPaused))
    assert paused.waits[0].kind == "timer" and paused.waits[0].due == timer.due
    assert ran == ["before", "after"]


async def test_a_moment_in_the_past_returns_at_once(wf: Settings) -> None:
    began = time.monotonic()
    moment = datetime(2020, 1, 1, tzinfo=UTC)
    assert await start_async(wait_until.options(settings=wf, run_id="past"), moment) == "woke"
    assert time.monotonic() - began < 5
    assert [e.due for e in await events(wf, "past") if isinstance(e, TimerStarted)] == [moment.timestamp()]


async def test_a_replay_waits_for_the_recorded_moment_not_a_recomputed_one(wf: Settings) -> None:
    task = asyncio.create_task(start_async(wait_from_now.options(settings=wf, run_id="recorded"), 1.5))
    await until_status(wf, "recorded", "paused")
    task.cancel()  # the caller goes away; the run stays paused with its timer
    with pytest.raises(asyncio.CancelledError):
        await task
    [first] = [e for e in await events(wf, "recorded") if isinstance(e, TimerStarted)]
    await anyio.sleep(0.5)  # the replay's datetime.now() is later: its moment would be later too
    await start_async(wait_from_now.options(settings=wf, run_id="recorded"), 1.5)
    log = await events(wf, "recorded")
    assert [e.due for e in log if isinstance(e, TimerStarted)] == [first.due]
    assert first.due <= log[-1].time < first.due + 0.4  # a recomputed moment would end 0.5 s later
    # What sleep_until returned on the replay is the recorded moment, in the timezone asked for: a step
    # given it records the same argument (a recomputed one would be 0.5 s later, and a divergence).
    recorded = datetime.fromtimestamp(first.due, ZoneInfo("Europe/Berlin"))
    assert ran == [f"woke {recorded.isoformat()}"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (datetime(2030, 1, 1, 9, 0), r"sleep_until\(2030-01-01T09:00:00\): the datetime is naive"),
        ("2030-01-01T09:00:00Z", "needs an aware datetime, got '2030-01-01T09:00:00Z'"),
        (1893456000.0, "needs an aware datetime, got 1893456000.0"),
    ],
)
async def test_sleep_until_refuses_what_is_not_an_aware_datetime(bad: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        sleep_until(bad)  # type: ignore[arg-type]


async def test_outside_a_run_it_is_a_plain_sleep() -> None:
    began = time.monotonic()
    moment = datetime.now(UTC) + timedelta(seconds=0.2)
    assert await sleep_until(moment) == moment
    assert 0.15 <= time.monotonic() - began < 5


@workflow
async def race_a_moment(moment: datetime) -> int:
    winner, _ = await race(hook(token="never-sent"), sleep_until(moment))
    return winner


async def test_sleep_until_races_like_sleep(wf: Settings) -> None:
    moment = datetime.now(UTC) + timedelta(seconds=0.3)
    assert await start_async(race_a_moment.options(settings=wf, run_id="raced"), moment) == 1


# --- the timer clock: what a test clock moves ----------------------------------------------------------------------


@workflow
async def long_nap() -> str:
    await sleep("2d")
    return "rested"


async def test_timers_are_due_by_the_timer_clock_which_a_skew_moves(wf: Settings) -> None:
    set_skew(wf.prefix, 3 * 86400.0)  # three days ahead of the server
    try:
        moment = datetime.now(UTC) + timedelta(days=3, seconds=0.3)
        began = time.monotonic()
        assert await start_async(wait_until.options(settings=wf, run_id="skewed"), moment) == "woke"
        assert time.monotonic() - began < 5  # not three days
        task = asyncio.create_task(start_async(long_nap.options(settings=wf, run_id="long")))
        await until_status(wf, "long", "paused")
        [timer] = [e for e in await events(wf, "long") if isinstance(e, TimerStarted)]
        assert timer.due == pytest.approx(time.time() + 5 * 86400, abs=60)  # two days after the skewed now
        await anyio.sleep(0.3)
        assert not task.done()  # nothing moves until the clock does
        advance(wf.prefix, 2 * 86400.0)
        with anyio.fail_after(10):
            assert await task == "rested"
    finally:
        set_skew(wf.prefix, None)
