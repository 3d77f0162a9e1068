"""Pause and resume on real servers: hooks, durable sleep, race, parallel steps, child runs, cancel."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter
from typing import Any

import anyio
import msgspec
import pytest

from werkfluss import (
    HookConflictError,
    RunCancelledError,
    RunNotFoundError,
    SerializationError,
    Settings,
    StepFailedError,
    cancel_async,
    expire_hooks_async,
    hook,
    invoke_hook_async,
    pending_hooks_async,
    race,
    sleep,
    start_async,
    step,
    step_key,
    workflow,
)
from werkfluss._events import HookReceived, RaceWon, RunCancelled, RunPaused, RunStarted, StepCompleted, TimerStarted
from werkfluss._store._open import open_store

from .helpers import events, status, until_status

calls: Counter[str] = Counter()
flags: dict[str, Any] = {}
RESET = (calls, flags)  # What conftest's `wf` clears before each test.


@pytest.fixture
def wf(wf: Settings) -> Settings:
    # Timers this far off pause the run instead of waiting in memory; tests keep them short.
    return msgspec.structs.replace(wf, hold=0.05)


@step
async def note(label: str) -> str:
    calls[label] += 1
    return label.upper()


# --- hooks --------------------------------------------------------------------------------------------------------


@workflow
async def approval(order: str) -> str:
    before = await note(f"before-{order}")
    payload = await hook(token=f"approve:{order}")
    after = await note(f"after-{order}")
    return f"{before} {payload['ok']} {after}"


async def test_a_payload_delivered_before_the_run_reaches_the_hook_is_kept(wf: Settings) -> None:
    await invoke_hook_async(f"approve:{wf.prefix}early", {"ok": True}, settings=wf)
    assert [h.token for h in await pending_hooks_async(settings=wf)] == [f"approve:{wf.prefix}early"]
    result = await start_async(approval.options(settings=wf, run_id="early"), f"{wf.prefix}early")
    assert result == f"BEFORE-{wf.prefix.upper()}EARLY True AFTER-{wf.prefix.upper()}EARLY"
    assert not await pending_hooks_async(settings=wf)  # taken, so no longer pending
    received = [e for e in await events(wf, "early") if isinstance(e, HookReceived)]
    assert [(r.token, r.n) for r in received] == [(f"approve:{wf.prefix}early", 1)]
    assert not [e for e in await events(wf, "early") if isinstance(e, RunPaused)]  # never had to pause


async def test_a_run_pauses_on_a_hook_and_resumes_from_its_log_when_it_is_delivered(wf: Settings) -> None:
    token = f"approve:{wf.prefix}late"
    task = asyncio.create_task(start_async(approval.options(settings=wf, run_id="late"), f"{wf.prefix}late"))
    await until_status(wf, "late", "paused")
    state = await (await open_store(wf)).state("late")
    assert state.holder == ""  # parked: no process holds it
    await invoke_hook_async(token, {"ok": "yes"}, settings=wf)
    with anyio.fail_after(10):
        result = await task
    assert "yes" in result
    assert calls[f"before-{wf.prefix}late"] == 1  # replayed, not executed again, after the pause
    kinds = [type(e).__name__ for e in await events(wf, "late")]
    assert kinds[:4] == ["RunStarted", "StepCompleted", "RunPaused", "RunResumed"]
    assert kinds[-3:] == ["HookReceived", "StepCompleted", "RunCompleted"]
    paused = next(e for e in await events(wf, "late") if isinstance(e, RunPaused))
    assert [(w.kind, w.token) for w in paused.waits] == [("hook", token)]


@workflow
async def collect(count: int) -> list[int]:
    got = []
    async for payload in hook(token=f"numbers:{count}", type=int):
        got.append(payload)
        if len(got) == count:
            break
    return got


async def test_a_hook_is_an_async_iterator_of_payloads_in_delivery_order(wf: Settings) -> None:
    task = asyncio.create_task(start_async(collect.options(settings=wf, run_id="iter"), 3))
    for n in (10, 20, 30):
        await invoke_hook_async("numbers:3", n, settings=wf)
    with anyio.fail_after(10):
        assert await task == [10, 20, 30]
    assert await start_async(collect.options(settings=wf, run_id="iter"), 3) == [10, 20, 30]  # replayed


@dataclasses.dataclass
class Approval:
    ok: bool
    by: str


@step
async def send_link(token: str) -> None:
    flags["token"] = token


@workflow
async def default_token() -> Approval:
    h = hook(type=Approval)
    await send_link(h.token)
    return await h


async def test_the_default_token_is_deterministic_readable_and_payloads_decode_to_the_type(wf: Settings) -> None:
    task = asyncio.create_task(start_async(default_token.options(settings=wf, run_id="dflt")))
    await until_status(wf, "dflt", "paused")
    assert flags["token"] == "dflt:1"  # run ID and the hook's sequence number
    await invoke_hook_async("dflt:1", {"ok": True, "by": "ana"}, settings=wf)
    with anyio.fail_after(10):
        assert await task == Approval(ok=True, by="ana")


async def test_a_payload_that_cannot_be_stored_is_refused_and_nothing_is_delivered(wf: Settings) -> None:
    with pytest.raises(SerializationError, match=r"hook 'x1'.*payload"):
        await invoke_hook_async("x1", {"socket": object()}, settings=wf)
    assert not await pending_hooks_async(settings=wf)


async def test_unclaimed_payloads_are_listed_until_expired(wf: Settings) -> None:
    await invoke_hook_async("nobody", 1, settings=wf)
    await invoke_hook_async("nobody", 2, settings=wf)
    [pending] = await pending_hooks_async(settings=wf)
    assert (pending.token, pending.payloads, pending.owner) == ("nobody", 2, None)
    assert abs(pending.last_delivery - time.time()) < 60
    assert await expire_hooks_async("1h", settings=wf) == []  # too recent
    assert await expire_hooks_async(0, settings=wf) == ["nobody"]
    assert not await pending_hooks_async(settings=wf)


@workflow
async def claims(token: str) -> Any:
    return await hook(token=token)


async def test_a_token_belongs_to_one_run(wf: Settings) -> None:
    first = asyncio.create_task(start_async(claims.options(settings=wf, run_id="own1"), "shared"))
    await until_status(wf, "own1", "paused")
    with pytest.raises(HookConflictError, match="belongs to run 'own1'"):
        await start_async(claims.options(settings=wf, run_id="own2"), "shared")
    await invoke_hook_async("shared", "fine", settings=wf)
    with anyio.fail_after(10):
        assert await first == "fine"


# --- durable sleep ------------------------------------------------------------------------------------------------


@workflow
async def nap(seconds: float) -> str:
    await note("nap-before")
    await sleep(seconds)
    await note("nap-after")
    return "rested"


async def test_a_long_sleep_pauses_the_run_and_resumes_it_when_due(wf: Settings) -> None:
    began = time.time()
    assert await start_async(nap.options(settings=wf, run_id="nap"), 0.4) == "rested"
    assert time.time() - began >= 0.4
    kinds = [type(e).__name__ for e in await events(wf, "nap")]
    assert "RunPaused" in kinds and "TimerStarted" in kinds
    assert calls["nap-before"] == 1 and calls["nap-after"] == 1
    timer = next(e for e in await events(wf, "nap") if isinstance(e, TimerStarted))
    paused = next(e for e in await events(wf, "nap") if isinstance(e, RunPaused))
    assert paused.waits[0].kind == "timer" and paused.waits[0].due == timer.due


async def test_a_replay_does_not_restart_the_clock(wf: Settings) -> None:
    task = asyncio.create_task(start_async(nap.options(settings=wf, run_id="clock"), 2.0))
    await until_status(wf, "clock", "paused")
    task.cancel()  # the caller goes away; the run stays paused with its timer
    with pytest.raises(asyncio.CancelledError):
        await task
    await anyio.sleep(1.0)  # time passes while nobody holds the run
    await start_async(nap.options(settings=wf, run_id="clock"), 2.0)
    log = await events(wf, "clock")
    [timer] = [e for e in log if isinstance(e, TimerStarted)]  # the replay kept the first due time
    assert log[-1].time >= timer.due
    assert log[-1].time < timer.due + 0.8  # a restarted clock would end a second later


@pytest.mark.parametrize("text", ["400ms", "2h", "7d", "1h30m", "0.5s"])
async def test_sleep_accepts_durations_as_text(text: str) -> None:
    from werkfluss._options import parse_duration

    assert parse_duration(text) == {"400ms": 0.4, "2h": 7200, "7d": 604800, "1h30m": 5400, "0.5s": 0.5}[text]


async def test_sleep_refuses_bad_durations_naming_them() -> None:
    from werkfluss import ConfigurationError

    for bad in ("soon", "-1s", "5 parsecs", -3, float("nan"), ""):
        with pytest.raises(ConfigurationError, match="sleep duration"):
            sleep(bad)


# --- race ---------------------------------------------------------------------------------------------------------


@step
async def flaky_once(label: str) -> str:
    calls[label] += 1
    if calls[label] == 1:
        raise RuntimeError("fail the run once")
    return "ok"


@workflow
async def timeout_or_approval(order: str) -> tuple[int, Any]:
    winner, value = await race(hook(token=f"race:{order}"), sleep(0.2))
    await flaky_once(f"flaky-{order}")
    return winner, value


async def test_the_race_winner_is_recorded_and_replayed_even_if_another_is_ready_first(wf: Settings) -> None:
    with pytest.raises(StepFailedError):
        await start_async(timeout_or_approval.options(settings=wf, run_id="race"), wf.prefix)
    # Now the hook has a payload; a replay must still pick the recorded winner, the timer.
    await invoke_hook_async(f"race:{wf.prefix}", "too late", settings=wf)
    assert await start_async(timeout_or_approval.options(settings=wf, run_id="race"), wf.prefix) == (1, None)
    won = [e for e in await events(wf, "race") if isinstance(e, RaceWon)]
    assert [(w.seq, w.index) for w in won] == [(3, 1)]  # hook #1 and sleep #2 are numbered first
    assert [h.payloads for h in await pending_hooks_async(settings=wf)] == [1]  # the loser's payload stays


@step
async def slow_loser() -> str:
    try:
        await anyio.sleep(30)
    finally:
        flags["loser finished"] = True
    return "never"


@workflow
async def slow_race() -> int:
    winner, _ = await race(slow_loser(), note("quick"))
    return winner


async def test_losing_steps_are_cancelled(wf: Settings) -> None:
    with anyio.fail_after(10):
        assert await start_async(slow_race.options(settings=wf, run_id="loser")) == 1
    assert flags["loser finished"] is True  # its body was cancelled, not left running
    completed = [e.step for e in await events(wf, "loser") if isinstance(e, StepCompleted)]
    assert completed == [note.id]


@workflow
async def waits_for_approval(order: str) -> str:
    return str(await hook(token=f"child-approve:{order}"))


@step
async def long_child_step() -> str:
    await anyio.sleep(30)
    return "never"


@workflow
async def busy_child() -> str:
    return await long_child_step()


@workflow
async def child_race(order: str, mode: str) -> int:
    if mode == "paused":  # the child pauses on its hook, the sleep wins
        winner, _ = await race(waits_for_approval(order), sleep(0.2))
    else:  # the child is inside a step when a quick step wins
        winner, _ = await race(busy_child(), note("quick"))
    return winner


@pytest.mark.parametrize("mode", ["paused", "running"])
async def test_a_child_run_that_loses_a_race_is_cancelled(wf: Settings, mode: str) -> None:
    parent = f"child-race-{mode}"
    with anyio.fail_after(20):
        assert await start_async(child_race.options(settings=wf, run_id=parent), wf.prefix, mode) == 1
        # The child race's first racer is seq 1: its run is the parent's first child.
        await until_status(wf, f"{parent}/1", "cancelled")
    cancelled = [e for e in await events(wf, f"{parent}/1") if isinstance(e, RunCancelled)]
    assert [c.reason for c in cancelled] == [f"it lost race #3 of run {parent!r}"]
    # A rerun of the parent returns its recorded result and leaves the loser as it is.
    assert await start_async(child_race.options(settings=wf, run_id=parent), wf.prefix, mode) == 1
    assert len([e for e in await events(wf, f"{parent}/1") if isinstance(e, RunCancelled)]) == 1


# --- parallel steps -----------------------------------------------------------------------------------------------


@step
async def jitter(i: int) -> int:
    calls[f"jitter-{i}"] += 1
    await anyio.sleep(random.random() * 0.05)
    return i * i


@workflow
async def fan_out(mode: str) -> list[int]:
    if mode == "gather":
        results = list(await asyncio.gather(*(jitter(i) for i in range(6))))
    elif mode == "taskgroup":
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(jitter(i)) for i in range(6)]
        results = [t.result() for t in tasks]
    else:
        box: dict[int, int] = {}

        async def one(i: int) -> None:
            box[i] = await jitter(i)

        async with anyio.create_task_group() as atg:
            for i in range(6):
                atg.start_soon(one, i)
        results = [box[i] for i in range(6)]
    await flaky_once(f"fan-{mode}")
    return results


@pytest.mark.parametrize("mode", ["gather", "taskgroup", "anyio"])
async def test_parallel_steps_replay_identically_whatever_order_they_finished_in(wf: Settings, mode: str) -> None:
    with pytest.raises(StepFailedError):
        await start_async(fan_out.options(settings=wf, run_id=f"fan-{mode}"), mode)
    first = [e for e in await events(wf, f"fan-{mode}") if isinstance(e, StepCompleted)]
    assert sorted(e.seq for e in first) == list(range(1, 7))
    assert {e.seq: e.step for e in first} == dict.fromkeys(range(1, 7), jitter.id)
    assert await start_async(fan_out.options(settings=wf, run_id=f"fan-{mode}"), mode) == [i * i for i in range(6)]
    assert all(calls[f"jitter-{i}"] == 1 for i in range(6))  # every result came from the log


# --- child workflows ----------------------------------------------------------------------------------------------


@workflow
async def child(n: int) -> int:
    await note(f"child-{n}")
    return n * 10


@workflow
async def parent(label: str) -> list[int]:
    a = await child(1)
    b = await child(2)
    await flaky_once(f"parent-{label}")
    return [a, b]


async def test_a_child_workflow_is_a_run_of_its_own_and_a_parent_rerun_does_not_start_it_twice(wf: Settings) -> None:
    with pytest.raises(StepFailedError):
        await start_async(parent.options(settings=wf, run_id="p"), "x")
    assert await start_async(parent.options(settings=wf, run_id="p"), "x") == [10, 20]
    assert calls["child-1"] == 1 and calls["child-2"] == 1
    assert await status(wf, "p/1") == "completed" and await status(wf, "p/2") == "completed"
    started = (await events(wf, "p/1"))[0]
    assert isinstance(started, RunStarted) and started.parent == "p"
    recorded = [(e.seq, e.step) for e in await events(wf, "p") if isinstance(e, StepCompleted)]
    assert recorded[:2] == [(1, child.id), (2, child.id)]


@workflow
async def waits_for_hook(token: str) -> str:
    value = await hook(token=token)
    return f"child got {value}"


@workflow
async def parent_of_waiting(token: str) -> str:
    got = await waits_for_hook(token)
    await note("parent-after-child")
    return got


async def test_a_child_that_pauses_pauses_its_parent_and_its_wake_up_resumes_both(wf: Settings) -> None:
    token = f"child-hook:{wf.prefix}"
    task = asyncio.create_task(start_async(parent_of_waiting.options(settings=wf, run_id="pw"), token))
    await until_status(wf, "pw", "paused")
    await until_status(wf, "pw/1", "paused")
    await invoke_hook_async(token, 42, settings=wf)
    with anyio.fail_after(10):
        assert await task == "child got 42"
    assert calls["parent-after-child"] == 1


# --- cancellation -------------------------------------------------------------------------------------------------


async def test_cancelling_a_paused_run_ends_it_at_once_and_a_start_is_refused(wf: Settings) -> None:
    task = asyncio.create_task(start_async(claims.options(settings=wf, run_id="c-paused"), f"c:{wf.prefix}"))
    await until_status(wf, "c-paused", "paused")
    assert await cancel_async("c-paused", "customer changed their mind", settings=wf) is True
    with anyio.fail_after(10), pytest.raises(RunCancelledError, match="customer changed their mind"):
        await task
    assert await status(wf, "c-paused") == "cancelled"
    with pytest.raises(RunCancelledError):
        await start_async(claims.options(settings=wf, run_id="c-paused"), f"c:{wf.prefix}")
    last = (await events(wf, "c-paused"))[-1]
    assert isinstance(last, RunCancelled) and last.reason == "customer changed their mind"
    assert await cancel_async("c-paused", settings=wf) is False  # already cancelled


@step
async def long_step() -> None:
    flags["key"] = step_key()
    try:
        await anyio.sleep(30)
    finally:
        flags["long step ended"] = True


@workflow
async def busy() -> str:
    await long_step()
    await note("after-long")
    return "done"


async def test_cancelling_a_running_run_cancels_its_step_here_and_records_the_reason(wf: Settings) -> None:
    task = asyncio.create_task(start_async(busy.options(settings=wf, run_id="c-running")))
    with anyio.fail_after(10):
        while "key" not in flags:
            await anyio.sleep(0.01)
    began = time.monotonic()
    assert await cancel_async("c-running", "stop it", settings=wf) is True
    with anyio.fail_after(10), pytest.raises(RunCancelledError, match="stop it"):
        await task
    assert time.monotonic() - began < 2  # not the 30 s step, not a lease period
    assert flags["long step ended"] is True
    assert calls["after-long"] == 0
    assert await status(wf, "c-running") == "cancelled"


async def test_cancelling_a_parent_cancels_the_child_it_waits_for(wf: Settings) -> None:
    task = asyncio.create_task(start_async(parent_of_waiting.options(settings=wf, run_id="cp"), f"cp:{wf.prefix}"))
    await until_status(wf, "cp/1", "paused")
    await until_status(wf, "cp", "paused")
    assert await cancel_async("cp", "whole order", settings=wf)
    with anyio.fail_after(10), pytest.raises(RunCancelledError):
        await task
    assert await status(wf, "cp/1") == "cancelled"


async def test_cancelling_an_unknown_run_names_it(wf: Settings) -> None:
    with pytest.raises(RunNotFoundError, match="no run 'ghost'"):
        await cancel_async("ghost", settings=wf)
