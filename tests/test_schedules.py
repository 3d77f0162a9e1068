"""Schedules driven as a user would: declare a `Schedule` (or ``@schedule``), serve it with real workers
in this process (two or three on one key prefix), and count the runs by run ID; catch-up and overlap
policies, pause, resume and trigger, a schedule removed from the code, a rolling deploy, bad input, and
the ticks across both daylight-saving transitions of Europe/Berlin.

Downtime is simulated by writing the schedule's last tick back in time (the documented ``last`` field
of ``P{s:N}:schedule``), or by moving the test clock (`werkfluss._clock.set_skew`).
"""

from __future__ import annotations

import itertools
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from werkfluss import (
    ConfigurationError,
    Schedule,
    Settings,
    Worker,
    _clock,
    get_run_async,
    list_runs_async,
    list_schedules_async,
    pause_schedule_async,
    resume_schedule_async,
    schedule,
    step,
    trigger_schedule_async,
    workflow,
)
from werkfluss import _schedules as schedules_registry
from werkfluss._schedules import Timing, tick_time
from werkfluss._store._open import open_store
from werkfluss._worker._scheduler import GRACE

from .helpers import every_server, until_status  # noqa: F401 - every_server: the `server` fixture

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

# -- the workflows the schedules start ---------------------------------------------------------------------------------

seen: list[datetime] = []  # the tick times the workflows received, in order
gates: dict[str, anyio.Event] = {}
RESET = (seen, gates)


@workflow(name="sched.tick")
async def ticked(at: datetime) -> str:
    seen.append(at)
    return at.isoformat()


@step
async def hold(at: datetime) -> str:
    await gates.setdefault("open", anyio.Event()).wait()
    return at.isoformat()


@workflow(name="sched.held")
async def held(at: datetime) -> str:
    """Runs until the test opens its gate: a run that overlaps the next ticks."""
    seen.append(at)
    return await hold(at)


@workflow(name="sched.bounded", deadline="1h")
async def bounded(at: datetime) -> str:
    return at.isoformat()


@workflow(name="sched.two_args")
async def two_args(at: datetime, other: int) -> None:
    return None


@step
async def not_a_workflow(at: datetime) -> None:
    return None


@pytest.fixture
def declare() -> Iterator[Callable[..., Schedule]]:
    """Declare a schedule of a fresh name; forgotten after the test (later workers do not serve it)."""
    made: list[str] = []

    def make(wf: Any = ticked, cron: str | None = None, **options: Any) -> Schedule:
        declared = Schedule(f"t-{uuid.uuid4().hex[:8]}", wf, cron, **options)
        made.append(declared.name)
        return declared

    yield make
    for name in made:
        schedules_registry._SCHEDULES.pop(name, None)


@pytest.fixture
async def clock(wf: Settings) -> AsyncIterator[str]:
    """The test's key prefix, whose test clock a test may move; put back after it."""
    yield wf.prefix
    _clock.set_skew(wf.prefix, None)


async def runs_of(settings: Settings, declared: Schedule) -> dict[str, str]:
    """The runs of the schedule's ticks (not its triggers'): run ID -> status."""
    page = await list_runs_async(workflow=declared.workflow.id, limit=1000, settings=settings)
    return {r.run_id: r.status for r in page.runs if r.run_id.startswith(declared.name + "@") and "~" not in r.run_id}


def tick_of(run_id: str) -> datetime:
    """The tick a run ID names (``name@2026-03-29T01:00:00Z``)."""
    return datetime.strptime(run_id.rsplit("@", 1)[1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


async def until(predicate: Callable[[], Any], what: str, timeout: float = 20) -> None:
    """Poll the async `predicate` until it holds; fail after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(0.02)


async def info_of(settings: Settings, declared: Schedule) -> Any:
    """The schedule's `ScheduleInfo`, once a worker declared it (waiting up to 10 s)."""
    with anyio.fail_after(10):
        while True:
            for info in await list_schedules_async(settings=settings):
                if info.name == declared.name:
                    return info
            await anyio.sleep(0.02)


async def set_state(settings: Settings, declared: Schedule, **fields: int | str) -> None:
    """Write fields of the schedule's state hash (documented in `werkfluss._store._keys`)."""
    store = await open_store(settings)
    await store.client.hset(store._schedule(declared.name), mapping=fields)  # type: ignore[arg-type]


def now_ms(prefix: str) -> int:
    """The timer clock now, roughly (this process's clock plus the test clock), in ms."""
    return int((datetime.now(UTC).timestamp() + _clock.skew(prefix)) * 1000)


# -- ticks fire once each ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["every", "cron"])
async def test_each_tick_fires_one_run_across_three_workers(
    wf: Settings, declare: Callable[..., Schedule], how: str
) -> None:
    declared = declare(every="1s") if how == "every" else declare(cron="* * * * * *")
    async with Worker(settings=wf), Worker(settings=wf), Worker(settings=wf):
        await until(lambda: _count(wf, declared, 4), "four ticks")
        runs = await runs_of(wf, declared)
        live = await info_of(wf, declared)
        assert live.served and live.next_tick is not None and live.last_run is not None
        assert live.next_tick > tick_of(live.last_run)
    ticks = sorted(tick_of(r) for r in runs)
    # One run per tick, and no tick missed between the first and the last (1 s apart).
    assert len(ticks) == len(set(ticks)) == len(runs)
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(ticks)] == [1.0] * (len(ticks) - 1)
    await until(lambda: _all_done(wf, declared), "the runs complete")
    # Each run got its own tick (the nominal time, as an aware UTC datetime), once: three workers, one run.
    assert sorted(seen) == sorted(set(seen))
    assert set(ticks) <= set(seen)
    assert all(at.tzinfo is UTC for at in seen)
    info = await info_of(wf, declared)
    # The workers stopped gracefully: they withdrew their declaration, nobody serves it now.
    assert info.fired >= len(ticks) and not info.served and not info.paused and info.next_tick is None


async def _count(settings: Settings, declared: Schedule, wanted: int) -> bool:
    return len(await runs_of(settings, declared)) >= wanted


async def _all_done(settings: Settings, declared: Schedule) -> bool:
    return set((await runs_of(settings, declared)).values()) == {"completed"}


async def test_decorator_registers_the_schedule_and_returns_the_workflow(wf: Settings) -> None:
    @workflow(name=f"sched.decorated-{uuid.uuid4().hex[:6]}")
    async def decorated(at: datetime) -> str:
        return at.isoformat()

    try:
        assert schedule(every="1s", jitter="300ms")(decorated) is decorated
        declared = next(s for s in schedules_registry.declared_schedules() if s.name == decorated.id)
        assert declared.workflow is decorated and declared.jitter_seconds == 0.3
        async with Worker(settings=wf):
            await until(lambda: _count(wf, declared, 2), "two ticks")
        run_id = next(iter(await runs_of(wf, declared)))
        # Jitter: the same delay in every process, within [0, 0.3 s).
        assert 0 <= declared.jitter_delay(run_id) < 0.3
        assert declared.jitter_delay(run_id) == declared.jitter_delay(run_id)
    finally:
        schedules_registry._SCHEDULES.pop(decorated.id, None)


async def test_a_ticks_run_gets_the_workflows_deadline(wf: Settings, declare: Callable[..., Schedule]) -> None:
    declared = declare(bounded, every="1s")
    async with Worker(settings=wf):
        await until(lambda: _count(wf, declared, 1), "a tick")
        run_id = next(iter(await runs_of(wf, declared)))
        info = await get_run_async(run_id, settings=wf)
    # Counted from the run's creation, which is the tick (or just after it).
    assert info.deadline is not None
    assert timedelta(minutes=59) < info.deadline - tick_of(run_id) <= timedelta(hours=1, seconds=5)


# -- missed ticks ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("catch_up", "fired"), [("skip", 0), ("latest", 1), ("all", 3)])
async def test_ticks_missed_while_no_worker_ran(
    wf: Settings, declare: Callable[..., Schedule], clock: str, catch_up: str, fired: int
) -> None:
    # overlap="allow": the caught-up runs need not wait for each other (with "skip" only the first would fire).
    declared = declare(every="1m", catch_up=catch_up, max_catch_up=3, overlap="allow")
    # The timer clock half a minute past a tick: every missed tick is older than the grace.
    _clock.set_skew(clock, (30 - datetime.now(UTC).timestamp() % 60) % 60)
    store = await open_store(wf)
    await store.declare_schedule(declared.name, declared.encoded())
    # The last tick handled was ten minutes ago: the workers were down since.
    minute = 60_000
    last = (now_ms(wf.prefix) // minute - 10) * minute
    await set_state(wf, declared, last=last)
    async with Worker(settings=wf):
        await until(lambda: _handled_up_to_now(wf, declared), "the missed ticks handled")
        runs = await runs_of(wf, declared)
    newest = (now_ms(wf.prefix) // minute) * minute
    assert sorted(tick_of(r) for r in runs) == [tick_time(newest - k * minute) for k in range(fired)][::-1]
    info = await info_of(wf, declared)
    assert info.fired == fired
    assert info.skipped == 10 - fired


async def test_a_tick_a_dead_worker_claimed_fires_even_after_long_downtime(
    wf: Settings, declare: Callable[..., Schedule], clock: str
) -> None:
    """Every worker died right after one claimed a tick, ten minutes ago: that tick is owed (a live
    worker reached it), the ten after it were missed (catch_up="skip": none of them fires)."""
    declared = declare(every="1m", catch_up="skip", overlap="allow")
    _clock.set_skew(clock, (30 - datetime.now(UTC).timestamp() % 60) % 60)
    store = await open_store(wf)
    await store.declare_schedule(declared.name, declared.encoded())
    minute = 60_000
    claimed = (now_ms(wf.prefix) // minute - 10) * minute
    # The claim ran out on the server's clock 3 s after the tick (the test clock is `skew` ahead of it).
    until_ms = claimed + 3000 - int(_clock.skew(clock) * 1000)
    await set_state(wf, declared, last=claimed - minute, claim=f"{claimed}|dead-worker|{until_ms}")
    async with Worker(settings=wf):
        await until(lambda: _handled_up_to_now(wf, declared), "the ticks handled")
        runs = await runs_of(wf, declared)
    assert sorted(runs) == [declared.run_id(claimed)]
    info = await info_of(wf, declared)
    assert (info.fired, info.skipped) == (1, 10)


async def _handled_up_to_now(settings: Settings, declared: Schedule) -> bool:
    info = await info_of(settings, declared)
    return info.last_tick is not None and info.last_tick.timestamp() * 1000 >= now_ms(settings.prefix) - 60_000


async def test_a_tick_the_test_clock_jumps_past_is_missed_but_the_next_fires(
    wf: Settings, declare: Callable[..., Schedule], clock: str
) -> None:
    declared = declare(every="1h", catch_up="skip")
    async with Worker(settings=wf):
        await until(lambda: _declared(wf, declared), "the worker declared it")
        hour = 3600_000
        to_next = ((now_ms(clock) // hour + 1) * hour - now_ms(clock)) / 1000
        # Just before the next tick, then onto it: the workers fire it at once, not an hour later.
        _clock.set_skew(clock, to_next - 0.5)
        _clock.advance(clock, 0.6)
        await until(lambda: _count(wf, declared, 1), "the tick after the jump")
        # Two hours on at once: both ticks are missed (more than GRACE late), none fires.
        _clock.advance(clock, 2 * 3600 + GRACE)
        await until(lambda: _skipped(wf, declared, 2), "two ticks skipped")
        assert len(await runs_of(wf, declared)) == 1


async def _declared(settings: Settings, declared: Schedule) -> bool:
    return any(i.name == declared.name for i in await list_schedules_async(settings=settings))


async def _skipped(settings: Settings, declared: Schedule, wanted: int) -> bool:
    return bool((await info_of(settings, declared)).skipped >= wanted)


# -- overlap -----------------------------------------------------------------------------------------------------------


async def test_overlap_skip_skips_ticks_while_the_run_runs(wf: Settings, declare: Callable[..., Schedule]) -> None:
    declared = declare(held, every="1s", overlap="skip")
    async with Worker(settings=wf), Worker(settings=wf):
        await until(lambda: _skipped(wf, declared, 2), "two ticks skipped")
        runs = await runs_of(wf, declared)
        assert len(runs) == 1 and set(runs.values()) == {"running"}
        gates.setdefault("open", anyio.Event()).set()
        await until(lambda: _count(wf, declared, 2), "the next tick after the run ended")
    first, second = sorted(tick_of(r) for r in await runs_of(wf, declared))[:2]
    assert (second - first).total_seconds() >= 3  # the ticks between were skipped, not queued


async def test_overlap_queue_fires_the_waiting_ticks_once_the_run_ends(
    wf: Settings, declare: Callable[..., Schedule]
) -> None:
    declared = declare(held, every="1s", overlap="queue", max_catch_up=2)
    async with Worker(settings=wf), Worker(settings=wf):
        await until(lambda: _count(wf, declared, 1), "the first run")
        await until(lambda: _older_than(wf, declared, 4), "four ticks waiting")
        assert len(await runs_of(wf, declared)) == 1
        gates.setdefault("open", anyio.Event()).set()
        await until(lambda: _count(wf, declared, 4), "the waiting ticks and the next")
        runs = await runs_of(wf, declared)
    ticks = sorted(tick_of(r) for r in runs)
    # After the first run ended, the newest max_catch_up (2) waiting ticks fired back to back, the rest skipped.
    assert (ticks[1] - ticks[0]).total_seconds() >= 3
    assert (ticks[2] - ticks[1]).total_seconds() == 1
    assert (await info_of(wf, declared)).skipped >= 1


async def _older_than(settings: Settings, declared: Schedule, seconds: float) -> bool:
    runs = await runs_of(settings, declared)
    return bool(runs) and now_ms(settings.prefix) / 1000 - min(tick_of(r) for r in runs).timestamp() >= seconds


async def test_overlap_allow_fires_while_the_run_runs(wf: Settings, declare: Callable[..., Schedule]) -> None:
    declared = declare(held, every="1s", overlap="allow")
    async with Worker(settings=wf):
        await until(lambda: _count(wf, declared, 3), "three runs at once")
        assert set((await runs_of(wf, declared)).values()) == {"running"}
        gates.setdefault("open", anyio.Event()).set()
        await until(lambda: _all_done(wf, declared), "the runs complete")


# -- pause, resume, trigger --------------------------------------------------------------------------------------------


async def test_pause_resume_and_trigger(wf: Settings, declare: Callable[..., Schedule], clock: str) -> None:
    declared = declare(every="1m")
    async with Worker(settings=wf), Worker(settings=wf):
        await until(lambda: _declared(wf, declared), "the workers declared it")
        await pause_schedule_async(declared.name, settings=wf)
        assert (await info_of(wf, declared)).paused
        _clock.advance(clock, 180)  # three ticks during the pause
        run_id = await trigger_schedule_async(declared.name, settings=wf)
        assert re.fullmatch(re.escape(declared.name) + r"@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z~trigger-1", run_id)
        # A trigger fires paused or not (a worker looked after the pause and the jump), and no tick did.
        await until_status(wf, run_id, "completed")
        assert await runs_of(wf, declared) == {}
        info = await info_of(wf, declared)
        assert info.last_run == run_id and info.last_status == "completed" and info.fired == 1
        assert info.next_tick is None
        await resume_schedule_async(declared.name, settings=wf)
        # The pause's ticks are not caught up: the next tick after the resume fires.
        resumed = now_ms(clock)
        _clock.advance(clock, (60_000 - resumed % 60_000) / 1000 + 0.1)  # onto the next tick
        await until(lambda: _count(wf, declared, 1), "the tick after the resume")
        (tick,) = [tick_of(r) for r in await runs_of(wf, declared)]
        assert tick.timestamp() * 1000 > resumed - 1000
    second = await trigger_schedule_async(declared.name, settings=wf)
    assert second.endswith("~trigger-2")
    assert (await info_of(wf, declared)).triggers_waiting == 1  # no worker runs: it waits


async def test_steering_an_unknown_schedule_names_the_known_ones(
    wf: Settings, declare: Callable[..., Schedule]
) -> None:
    declared = declare(every="1m")
    store = await open_store(wf)
    await store.declare_schedule(declared.name, declared.encoded())
    for call in (pause_schedule_async, resume_schedule_async, trigger_schedule_async):
        with pytest.raises(ConfigurationError, match=rf"no schedule 'nope'.*known schedules: {declared.name}"):
            await call("nope", settings=wf)


# -- removed, changed --------------------------------------------------------------------------------------------------


async def test_a_schedule_removed_from_the_code_stops_firing(
    wf: Settings, declare: Callable[..., Schedule], clock: str
) -> None:
    removed = declare(every="1m")
    async with Worker(settings=wf):
        await until(lambda: _declared(wf, removed), "the worker declared it")
    schedules_registry._SCHEDULES.pop(removed.name)
    kept = declare(every="1m")
    async with Worker(settings=wf):
        await until(lambda: _declared(wf, kept), "the worker declared the kept one")
        _clock.advance(clock, (60_000 - now_ms(clock) % 60_000) / 1000 + 0.1)  # onto the next tick
        # The kept schedule's tick proves a worker looked after the jump; the removed one fired nothing.
        await until(lambda: _count(wf, kept, 1), "the kept schedule's tick")
        assert await runs_of(wf, removed) == {}
    # No worker renews it: a minute later it shows as not served, with no next tick.
    await set_state(wf, removed, seen=int(datetime.now(UTC).timestamp() * 1000) - 61_000)
    info = await info_of(wf, removed)
    assert not info.served and info.next_tick is None


async def test_a_different_declaration_stands_while_its_workers_renew_it(
    wf: Settings, declare: Callable[..., Schedule], caplog: pytest.LogCaptureFixture
) -> None:
    declared = declare(every="1s")
    store = await open_store(wf)
    old = Schedule(f"{declared.name}-old", ticked, every="1h").declaration() | {"name": declared.name}
    schedules_registry._SCHEDULES.pop(f"{declared.name}-old")
    import json

    await store.declare_schedule(declared.name, json.dumps(old, sort_keys=True, separators=(",", ":")))
    async with Worker(settings=wf):
        await until(lambda: _declared(wf, declared), "listed")
        with anyio.fail_after(10):
            while "another process declared it" not in caplog.text:
                await anyio.sleep(0.02)
    assert await runs_of(wf, declared) == {}  # the worker with the new declaration left it to the old one
    assert "every='1h'" in (await info_of(wf, declared)).declared
    # Once the old one is not renewed for a minute, the new one takes over (at the next renewal).
    await set_state(wf, declared, seen=int(datetime.now(UTC).timestamp() * 1000) - 61_000)
    assert await store.declare_schedule(declared.name, declared.encoded()) is None
    assert "every='1s'" in (await info_of(wf, declared)).declared


async def test_a_worker_stopping_hands_the_schedule_to_a_new_declaration_at_once(
    wf: Settings, declare: Callable[..., Schedule]
) -> None:
    """A deploy that stops every old worker and starts new ones with a changed schedule: the new
    declaration fires within seconds, not a minute later (a new user's redeploy lost a minute of ticks)."""
    declared = declare(every="1s")
    store = await open_store(wf)
    old = Schedule(f"{declared.name}-old", ticked, every="1h").declaration() | {"name": declared.name}
    schedules_registry._SCHEDULES.pop(f"{declared.name}-old")
    import json

    old_json = json.dumps(old, sort_keys=True, separators=(",", ":"))
    await store.declare_schedule(declared.name, old_json)  # an old worker, alive
    async with Worker(settings=wf):
        await until(lambda: _declared(wf, declared), "listed")
        assert await runs_of(wf, declared) == {}  # held off while the old declaration stands
        assert await store.withdraw_schedule(declared.name, old_json)  # the old worker stops gracefully
        began = anyio.current_time()
        await until(lambda: _count(wf, declared, 1), "the new declaration to fire", timeout=10)
        assert anyio.current_time() - began < 8  # the worker looks again every 2 s, not every 20
    # This worker stopped gracefully too: its declaration no longer stands against another.
    assert not await store.withdraw_schedule(declared.name, old_json)
    assert await store.declare_schedule(declared.name, old_json) is None


# -- bad input ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        (("0 9 * * MONDAY",), {}, r"schedule 't-bad': invalid cron expression '0 9 \* \* MONDAY'"),
        (("61 * * * *",), {}, r"invalid cron expression '61 \* \* \* \*'"),
        (("* * *",), {}, r"invalid cron expression '\* \* \*'"),
        ((5,), {}, r"the cron expression must be a string"),
        (("0 9 * * *",), {"timezone": "Mars/Olympus"}, r"schedule 't-bad': unknown timezone 'Mars/Olympus'"),
        (("0 9 * * *",), {"timezone": 1}, r"timezone must be an IANA name"),
        (("0 9 * * *",), {"every": "1m"}, r"either a cron expression or every=, not both"),
        ((), {}, r"either a cron expression or every="),
        ((), {"every": "500ms"}, r"every must be a whole number of seconds, at least 1 s, got '500ms'"),
        ((), {"every": "1.5s"}, r"whole number of seconds"),
        ((), {"every": "soon"}, r"invalid every of schedule 't-bad' 'soon'"),
        ((), {"every": "1h", "timezone": "Europe/Berlin"}, r"applies to cron expressions only"),
        (("0 9 * * *",), {"catch_up": "some"}, r"catch_up must be one of skip, latest, all, got 'some'"),
        (("0 9 * * *",), {"overlap": "both"}, r"overlap must be one of skip, queue, allow, got 'both'"),
        (("0 9 * * *",), {"max_catch_up": 0}, r"max_catch_up must be a whole number from 1"),
        (("0 9 * * *",), {"jitter": -1}, r"invalid jitter of schedule 't-bad'"),
    ],
)
def test_bad_declarations_name_the_schedule_and_the_value(
    args: tuple[Any, ...], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Schedule("t-bad", ticked, *args, **options)
    assert "t-bad" not in {s.name for s in schedules_registry.declared_schedules()}


def test_bad_workflows_and_names() -> None:
    with pytest.raises(ConfigurationError, match=r"cannot be called with the tick time as its one positional"):
        Schedule("t-bad", two_args, every="1m")
    with pytest.raises(ConfigurationError, match=r"is not a workflow; decorate it with @workflow"):
        Schedule("t-bad", not_a_workflow, every="1m")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"@schedule decorates a workflow.*put @schedule\(...\) above"):
        schedule(every="1m")(not_a_workflow)  # type: ignore[type-var]
    with pytest.raises(ConfigurationError, match=r"invalid schedule name 'a b'"):
        Schedule("a b", ticked, every="1m")
    with pytest.raises(ConfigurationError, match=r"invalid schedule name 'x{y}'"):
        Schedule("x{y}", ticked, every="1m")


def test_a_name_declared_twice_differently_is_refused(declare: Callable[..., Schedule]) -> None:
    first = declare(every="1m")
    assert Schedule(first.name, ticked, every="1m") is not None  # the same again (a module imported twice)
    with pytest.raises(ConfigurationError, match=rf"schedule '{first.name}' is declared twice in this process"):
        Schedule(first.name, ticked, every="2m")


# -- the ticks themselves: intervals, cron, daylight saving ---------------------------------------------------------


def _at(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def _utc(ms: int) -> str:
    return f"{tick_time(ms):%Y-%m-%d %H:%M:%S}"


def test_interval_ticks_are_aligned_to_the_epoch() -> None:
    timing = Timing(None, 900)
    assert _utc(timing.after(_at("2026-05-01T10:07:13+00:00")) or 0) == "2026-05-01 10:15:00"
    assert _utc(timing.after(_at("2026-05-01T10:15:00+00:00")) or 0) == "2026-05-01 10:30:00"
    ticks, more = timing.ticks(_at("2026-05-01T10:00:00+00:00"), _at("2026-05-01T11:00:00+00:00"), 3)
    assert [_utc(t) for t in ticks] == ["2026-05-01 10:30:00", "2026-05-01 10:45:00", "2026-05-01 11:00:00"]
    assert more == 1


def test_cron_ticks_forwards_and_backwards_agree() -> None:
    timing = Timing("0 9 * * MON-FRI", None, "Europe/Berlin")
    start, end = _at("2026-06-05T00:00:00+00:00"), _at("2026-06-12T00:00:00+00:00")  # Friday to Friday
    walked, at = [], start
    while (at := timing.after(at) or end) < end:
        walked.append(at)
    ticks, more = timing.ticks(start, end, 100)
    assert ticks == walked and more == 0
    assert [_utc(t) for t in ticks] == [f"2026-06-{d:02d} 07:00:00" for d in (5, 8, 9, 10, 11)]  # CEST = UTC+2


def test_spring_forward_a_time_that_does_not_exist_fires_once_at_three() -> None:
    # 2026-03-29, Europe/Berlin: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
    timing = Timing("30 2 * * *", None, "Europe/Berlin")
    ticks, _ = timing.ticks(_at("2026-03-27T12:00:00+00:00"), _at("2026-03-31T12:00:00+00:00"), 10)
    assert [_utc(t) for t in ticks] == [
        "2026-03-28 01:30:00",  # 02:30 CET
        "2026-03-29 01:00:00",  # 03:00 CEST: the first valid moment after 02:30
        "2026-03-30 00:30:00",  # 02:30 CEST
        "2026-03-31 00:30:00",
    ]
    assert timing.after(_at("2026-03-28T12:00:00+00:00")) == _at("2026-03-29T01:00:00+00:00")


def test_fall_back_a_time_that_happens_twice_fires_once() -> None:
    # 2026-10-25, Europe/Berlin: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice.
    timing = Timing("30 2 * * *", None, "Europe/Berlin")
    ticks, _ = timing.ticks(_at("2026-10-23T12:00:00+00:00"), _at("2026-10-27T12:00:00+00:00"), 10)
    assert [_utc(t) for t in ticks] == [
        "2026-10-24 00:30:00",
        "2026-10-25 00:30:00",  # 02:30 CEST, the first; not again at 02:30 CET
        "2026-10-26 01:30:00",
        "2026-10-27 01:30:00",
    ]
    assert timing.after(_at("2026-10-25T00:30:00+00:00")) == _at("2026-10-26T01:30:00+00:00")
    # An expression that is not at a fixed time ticks in both of the repeated hours (Debian cron's rule).
    half_hourly = Timing("*/30 * * * *", None, "Europe/Berlin")
    ticks, _ = half_hourly.ticks(_at("2026-10-24T23:59:00+00:00"), _at("2026-10-25T01:59:00+00:00"), 10)
    assert [_utc(t) for t in ticks] == [f"2026-10-25 {h}" for h in ("00:00:00", "00:30:00", "01:00:00", "01:30:00")]


def test_run_ids_name_the_schedule_and_the_tick(declare: Callable[..., Schedule]) -> None:
    declared = declare(cron="30 2 * * *", timezone="Europe/Berlin")
    assert declared.run_id(_at("2026-03-29T01:00:00+00:00")) == f"{declared.name}@2026-03-29T01:00:00Z"
    assert tick_time(_at("2026-03-29T01:00:00+00:00")) == datetime(2026, 3, 29, 1, tzinfo=UTC)
    assert timedelta(seconds=declared.jitter_delay("x")) == timedelta(0)  # no jitter declared
