"""Run deadlines on real servers: a run past its deadline is cancelled wherever it is
(executing a step, paused on a hook or a sleep, waiting in its queue, held by a worker
that died), with its children, and its callers get `RunTimeoutError`."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest

from werkfluss import (
    ConfigurationError,
    HookClosedError,
    RunCancelledError,
    RunTimeoutError,
    Settings,
    StepFailedError,
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
from werkfluss._clock import advance, set_skew
from werkfluss._engine._run_deadline import cancelled_error, duration_text, is_deadline_reason, reason
from werkfluss._events import HookReceived, RunCancelled
from werkfluss._store._open import close_stores, open_store
from werkfluss.testing import TestClock

from .deadline_flows import slow_job
from .helpers import (
    events,
    every_server,  # noqa: F401 - valkey, redis and the cluster
    run_cli,
    status,
    until_status,
)
from .workers import Workers, server_env

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from .conftest import Server

calls: Counter[str] = Counter()
flags: dict[str, Any] = {}
RESET = (calls, flags)  # What conftest's `wf` clears before each test.

# "deadline 2h passed at 2026-12-02T10:00:00Z", the duration as the user wrote it.
PASSED = r"deadline {} passed at \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"


@pytest.fixture
def wf(wf: Settings) -> Iterator[Settings]:
    # Timers this far off pause the run instead of waiting in memory; tests keep them short.
    yield msgspec.structs.replace(wf, hold=0.05)
    set_skew(wf.prefix, None)  # the test clock of this prefix, if the test moved it


@step
async def note(label: str) -> str:
    calls[label] += 1
    return label


@step
async def long_step(label: str) -> None:
    flags[f"{label} began"] = True
    try:
        await anyio.sleep(30)
    finally:
        flags[f"{label} ended"] = True


async def _until(flag: str) -> None:
    with anyio.fail_after(10):
        while flag not in flags:
            await anyio.sleep(0.01)


# --- a running step -------------------------------------------------------------------------------------------------


@workflow(deadline=0.5)
async def hurried(label: str) -> str:
    await long_step(label)
    await note(f"{label} after")
    return "done"


async def test_a_step_running_past_the_deadline_is_cancelled_and_the_run_ends_timed_out(wf: Settings) -> None:
    began = time.monotonic()
    with anyio.fail_after(10), pytest.raises(RunTimeoutError, match=PASSED.format("500ms")) as raised:
        await start_async(hurried.options(settings=wf, run_id="h1"), "h1")
    assert time.monotonic() - began < 5  # the deadline, not the 30 s step
    assert isinstance(raised.value, RunCancelledError) and raised.value.run_id == "h1"
    assert flags["h1 ended"] is True  # cancelled through anyio: its finally ran
    assert calls["h1 after"] == 0
    assert await status(wf, "h1") == "cancelled"
    last = (await events(wf, "h1"))[-1]
    assert isinstance(last, RunCancelled) and re.fullmatch(PASSED.format("500ms"), last.reason)
    info = await get_run_async("h1", settings=wf)
    assert info.timed_out and info.cancel_reason == last.reason
    assert info.deadline is not None
    assert abs((info.deadline - info.created).total_seconds() - 0.5) < 0.5  # counted from its creation
    # Starting it again executes nothing and says why, as a RunTimeoutError again.
    with pytest.raises(RunTimeoutError):
        await start_async(hurried.options(settings=wf, run_id="h1"), "h1")
    assert calls["h1 after"] == 0


@workflow(deadline="1h")
async def quick(label: str) -> str:
    await note(label)
    await sleep(0.2)  # pauses (hold is 0.05 s): its timer is the sleep's, not the deadline's
    return await note(f"{label} woke")


async def test_a_run_that_ends_before_its_deadline_is_untouched_and_leaves_no_timer(wf: Settings) -> None:
    with anyio.fail_after(10):
        assert await start_async(quick.options(settings=wf, run_id="q1"), "q1") == "q1 woke"
    store = await open_store(wf)
    assert await store.due(["q1"]) == [None]
    info = await get_run_async("q1", settings=wf)
    assert info.status == "completed" and not info.timed_out and info.deadline is not None


# --- paused runs: a hook, a long sleep ------------------------------------------------------------------------------


@workflow(deadline="2h")
async def awaits_approval(token: str) -> str:
    await note("asked")
    got = await hook(token=token)
    return f"approved {got}"


@workflow(deadline="2h")
async def naps_a_week() -> str:
    await sleep("7d")
    return await note("a week later")


@pytest.mark.parametrize("waits_on", ["hook", "sleep"])
async def test_a_paused_run_wakes_at_its_deadline_and_ends_cancelled(wf: Settings, waits_on: str) -> None:
    run_id, token = f"p-{waits_on}", f"approve:{wf.prefix}{waits_on}"
    if waits_on == "hook":
        call = start_async(awaits_approval.options(settings=wf, run_id=run_id), token)
    else:
        call = start_async(naps_a_week.options(settings=wf, run_id=run_id))
    task = asyncio.create_task(call)
    await until_status(wf, run_id, "paused")
    info = await get_run_async(run_id, settings=wf)
    assert info.deadline is not None
    store = await open_store(wf)
    [due] = await store.due([run_id])
    assert due == pytest.approx(info.deadline.timestamp(), abs=0.002)  # min(the week, the deadline)
    began = time.monotonic()
    advance(wf.prefix, 2 * 3600)  # the test clock: 2 h pass now
    with anyio.fail_after(10), pytest.raises(RunTimeoutError, match=PASSED.format("2h")):
        await task
    assert time.monotonic() - began < 5
    assert await status(wf, run_id) == "cancelled"
    assert not [e for e in await events(wf, run_id) if isinstance(e, HookReceived)]
    assert calls["a week later"] == 0
    if waits_on == "hook":
        with pytest.raises(HookClosedError):
            await invoke_hook_async(token, "too late", settings=wf)


@workflow(deadline="30d")
async def naps_within_its_deadline() -> str:
    await sleep("7d")
    return await note("a week later")


async def test_with_an_auto_test_clock_a_week_long_sleep_meets_or_misses_its_deadline_in_no_time(wf: Settings) -> None:
    began = time.monotonic()
    async with TestClock(wf):
        assert await start_async(naps_within_its_deadline.options(settings=wf, run_id="in-time")) == "a week later"
        with pytest.raises(RunTimeoutError, match=PASSED.format("1d")):
            await start_async(naps_within_its_deadline.options(settings=wf, run_id="too-late", deadline="1d"))
    assert time.monotonic() - began < 5
    assert calls["a week later"] == 1


# --- children -------------------------------------------------------------------------------------------------------


@workflow
async def child_waits(token: str) -> str:
    return str(await hook(token=token))


@workflow(deadline="2h")
async def parent_of_paused(token: str) -> str:
    return await child_waits(token)


async def test_a_parent_past_its_deadline_cancels_the_paused_child_it_waits_for(wf: Settings) -> None:
    token = f"child:{wf.prefix}"
    task = asyncio.create_task(start_async(parent_of_paused.options(settings=wf, run_id="pp"), token))
    await until_status(wf, "pp/1", "paused")
    await until_status(wf, "pp", "paused")
    advance(wf.prefix, 2 * 3600 + 1)
    with anyio.fail_after(10), pytest.raises(RunTimeoutError):
        await task
    assert await status(wf, "pp/1") == "cancelled"
    child = await get_run_async("pp/1", settings=wf)
    assert child.cancel_reason is not None and child.cancel_reason.startswith("parent run 'pp' timed out: deadline 2h")
    assert not child.timed_out  # cancelled with its parent: it had no deadline of its own
    with pytest.raises(RunCancelledError) as raised:
        await start_async(child_waits.options(settings=wf, run_id="pp/1"), token)
    assert not isinstance(raised.value, RunTimeoutError)


@workflow
async def child_busy(label: str) -> str:
    await long_step(label)
    return "child done"


@workflow(deadline=0.5)
async def parent_of_busy(label: str) -> str:
    return await child_busy(label)


async def test_a_parent_past_its_deadline_cancels_the_child_executing_in_its_process(wf: Settings) -> None:
    with anyio.fail_after(10), pytest.raises(RunTimeoutError):
        await start_async(parent_of_busy.options(settings=wf, run_id="pb"), "pb-child")
    assert flags["pb-child ended"] is True  # the child's step was cancelled through anyio
    assert await status(wf, "pb") == "cancelled"
    assert await status(wf, "pb/1") == "cancelled"
    [cancelled] = [e for e in await events(wf, "pb/1") if isinstance(e, RunCancelled)]
    assert cancelled.reason.startswith("parent run 'pb' timed out: deadline 500ms passed at")


@workflow
async def parent_without_deadline(label: str) -> str:
    return await child_busy(label)


async def test_a_cancel_of_a_parent_cancels_the_child_executing_in_its_process_too(wf: Settings) -> None:
    # The same path as a deadline's: a cancel() of the parent stops the child with it.
    task = asyncio.create_task(start_async(parent_without_deadline.options(settings=wf, run_id="pc"), "pc-child"))
    await _until("pc-child began")
    assert await cancel_async("pc", "order withdrawn", settings=wf)
    with anyio.fail_after(10), pytest.raises(RunCancelledError, match="order withdrawn"):
        await task
    assert flags["pc-child ended"] is True
    await until_status(wf, "pc/1", "cancelled")
    assert (await get_run_async("pc/1", settings=wf)).cancel_reason == "order withdrawn"


@workflow(deadline=0.5)
async def child_in_a_hurry(label: str) -> str:
    await long_step(label)
    return "child done"


@workflow
async def patient_parent(label: str) -> str:
    try:
        return await child_in_a_hurry(label)
    except StepFailedError as exc:
        return f"child failed: {exc.error_type}"


async def test_a_child_with_its_own_deadline_times_out_and_its_parent_sees_the_failure(wf: Settings) -> None:
    with anyio.fail_after(10):
        result = await start_async(patient_parent.options(settings=wf, run_id="pa"), "pa-child")
    assert result.startswith("child failed: ") and "RunTimeoutError" in result
    assert flags["pa-child ended"] is True
    assert await status(wf, "pa") == "completed"
    child = await get_run_async("pa/1", settings=wf)
    assert child.status == "cancelled" and child.timed_out


# --- the queue, per-run options -------------------------------------------------------------------------------------


@workflow(deadline="1h")
async def report(label: str) -> str:
    return await note(label)


async def test_a_run_waiting_in_its_queue_past_its_deadline_is_cancelled_without_running(wf: Settings) -> None:
    await enqueue_async(report.options(settings=wf, run_id="late"), "late")
    await enqueue_async(report.options(settings=wf, run_id="longer", deadline="3h"), "longer")  # overrides 1h
    late, longer = [await get_run_async(r, settings=wf) for r in ("late", "longer")]
    assert late.deadline is not None and longer.deadline is not None
    assert (longer.deadline - late.deadline).total_seconds() == pytest.approx(2 * 3600, abs=2)
    set_skew(wf.prefix, 2 * 3600)  # two hours in the queue, and no worker took them
    async with Worker(settings=wf):
        await until_status(wf, "late", "cancelled")
        await until_status(wf, "longer", "completed")
    assert calls["late"] == 0 and calls["longer"] == 1  # the late one never ran its body
    info = await get_run_async("late", settings=wf)
    assert info.timed_out and info.cancel_reason is not None and re.fullmatch(PASSED.format("1h"), info.cancel_reason)
    with pytest.raises(RunTimeoutError):
        await start_async(report.options(settings=wf, run_id="late"), "late")


async def test_options_deadline_overrides_the_decorators_for_start(wf: Settings) -> None:
    with anyio.fail_after(10), pytest.raises(RunTimeoutError, match=PASSED.format("300ms")):
        await start_async(hurried.options(settings=wf, run_id="o1", deadline=timedelta(milliseconds=300)), "o1")
    # The deadline belongs to the run once created: starting it again under other options changes nothing.
    with pytest.raises(RunTimeoutError, match=PASSED.format("300ms")):
        await start_async(hurried.options(settings=wf, run_id="o1", deadline="5h"), "o1")


# --- restarts -------------------------------------------------------------------------------------------------------


def _ledger(path: Path) -> list[tuple[str, int]]:
    """``(step key, pid)`` of each step execution the worker processes wrote."""
    if not path.exists():
        return []
    return [(key, int(pid)) for key, pid, _ in (line.split() for line in path.read_text().splitlines())]


async def test_a_deadline_survives_a_restart_and_the_next_worker_cancels_the_run_at_it(
    server: Server, prefix: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    env = server_env(server, prefix, WF_LEDGER=str(ledger), WERKFLUSS_LEASE="1")
    settings = server.settings(prefix)
    workers = Workers(env, tmp_path, "tests.deadline_flows")
    try:
        first = workers.start()
        # The deadline is the run's own option: the worker processes' workflow has none.
        await enqueue_async(slow_job.options(settings=settings, run_id="survivor", deadline="6s"), 60.0)
        with anyio.fail_after(20):
            while not _ledger(ledger):
                await anyio.sleep(0.02)
        workers.kill(first)  # mid-step: nothing but the store remembers the deadline now
        second = workers.start()
        await until_status(settings, "survivor", "cancelled", timeout=30)
    finally:
        workers.stop_all()
    info = await get_run_async("survivor", settings=settings)
    pids = [pid for _, pid in _ledger(ledger)]
    assert pids[0] == first.pid
    assert second.pid in pids, workers.log(second)  # it took the run over and executed the step again
    assert info.timed_out and info.cancel_reason is not None
    assert re.fullmatch(PASSED.format("6s"), info.cancel_reason)
    assert info.deadline is not None
    cancelled = [e for e in await events(settings, "survivor") if isinstance(e, RunCancelled)]
    assert len(cancelled) == 1 and cancelled[0].time >= info.deadline.timestamp() - 0.05  # at, not before
    await close_stores()


# --- the command line -----------------------------------------------------------------------------------------------


async def test_runs_show_names_the_deadline_and_that_it_passed(wf: Settings, server: Server, prefix: str) -> None:
    with anyio.fail_after(10), pytest.raises(RunTimeoutError):
        await start_async(hurried.options(settings=wf, run_id="shown"), "shown")
    done = await run_cli("runs", "show", "shown", env=server_env(server, prefix))
    assert done.returncode == 0, done.stderr
    assert re.search(r"deadline \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC · passed: the run was cancelled", done.stdout)


# --- bad input and the reason's form --------------------------------------------------------------------------------


async def _body() -> None:
    return None


@pytest.mark.parametrize(
    ("deadline", "says"),
    [
        (0, "0 is not after the run's start"),
        (timedelta(0), "is not after the run's start"),
        (-1, "must be finite and not negative"),
        ("-2h", "invalid deadline"),
        ("soon", "use seconds, a timedelta, or text like"),
        (float("nan"), "must be finite"),
        (True, "use seconds, a timedelta"),
        (10**10, "longer than a century"),
    ],
)
def test_a_bad_deadline_is_refused_at_definition_and_options_naming_the_workflow(deadline: Any, says: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(says)) as defined:
        workflow(name="deadlines.refused", deadline=deadline)(_body)
    assert "deadlines.refused" in str(defined.value)
    with pytest.raises(ConfigurationError, match=re.escape(says)) as optioned:
        report.options(deadline=deadline)
    assert report.id in str(optioned.value)
    # A definition refused registers nothing: the name is free for a good one.
    assert workflow(name="deadlines.refused", deadline="1m")(_body).deadline == 60


def test_the_reason_names_the_deadline_as_written_and_when_it_passed() -> None:
    at = datetime(2026, 12, 2, 10, 0, tzinfo=UTC).timestamp()
    assert reason(7200, at) == "deadline 2h passed at 2026-12-02T10:00:00Z"
    assert reason(0.25, at + 0.5) == "deadline 250ms passed at 2026-12-02T10:00:00.500Z"
    assert [duration_text(s) for s in (5400, 90, 1.25, 86400 * 7, 3661)] == ["1h30m", "1m30s", "1.25s", "7d", "1h1m1s"]
    assert is_deadline_reason(reason(7200, at)) and not is_deadline_reason("customer cancelled")
    assert not is_deadline_reason(f"parent run 'p' timed out: {reason(7200, at)}")
    assert type(cancelled_error("r", reason(1, at))) is RunTimeoutError
    assert type(cancelled_error("r", "customer cancelled")) is RunCancelledError
