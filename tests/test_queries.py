"""get_run, list_runs, get_events, resume and the dead-letter queries against real servers."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import anyio
import pytest

import werkfluss
from werkfluss import (
    ConfigurationError,
    RunConflictError,
    RunNotFoundError,
    StepFailedError,
    dead_letters_async,
    get_events_async,
    get_run,
    get_run_async,
    hook,
    list_runs_async,
    queue_depth_async,
    redrive_async,
    resume_async,
    start_async,
    step,
    workflow,
)
from werkfluss._store._open import open_store
from werkfluss.events import HookReceived, RunFailed, RunPaused, RunStarted, StepCompleted, StepFailed

from .shop_flows import SECRET, attempts, checkout, run_checkout

if TYPE_CHECKING:
    from werkfluss import Settings

RESET = (attempts,)  # What conftest's `wf` clears before each test.


@step(name="q.double")
async def double(x: int) -> int:
    return 2 * x


@workflow(name="q.twice")
async def twice(x: int) -> int:
    return await double(await double(x))


@workflow(name="q.waits")
async def waits(x: int) -> int:
    return await hook(f"q-wait:{x}", type=int) + x


async def test_get_run_of_a_failed_run_has_its_error_args_and_attempts(wf: Settings) -> None:
    outcome = await run_checkout(wf, "bad-1")
    assert isinstance(outcome, StepFailedError)
    run = await get_run_async("bad-1", settings=wf)
    assert (run.run_id, run.workflow, run.status) == ("bad-1", "shop.checkout", "failed")
    assert run.args == ["bad-1"] and run.kwargs == {}
    assert run.result is None and run.waiting == []
    assert run.error is not None and run.error.type == "werkfluss.StepFailedError"
    assert "no courier for 3 parcels" in run.error.message and "Traceback" in run.error.traceback
    assert (run.last_step, run.last_seq, run.attempts) == ("shop.ship", 4, 1)
    assert run.events == len(await get_events_async("bad-1", settings=wf))
    assert run.created <= run.updated <= datetime.now(UTC) + timedelta(seconds=5)


async def test_get_run_of_a_paused_then_completed_run(wf: Settings) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: start_async(waits.options(run_id="q-w", settings=wf), 5))
        store = await open_store(wf)
        with anyio.fail_after(10):
            while await store.status("q-w") != "paused":
                await anyio.sleep(0.01)
        paused = await get_run_async("q-w", settings=wf)
        assert paused.status == "paused"
        assert [(w.kind, w.token) for w in paused.waiting] == [("hook", "q-wait:5")]
        await werkfluss.invoke_hook_async("q-wait:5", 1, settings=wf)
    done = await get_run_async("q-w", settings=wf)
    assert (done.status, done.result, done.error, done.waiting) == ("completed", 6, None, [])


async def test_get_run_counts_the_attempts_of_a_retried_step(wf: Settings) -> None:
    assert await run_checkout(wf, "ok-1", approve_after="paused") == f"ok-1 shipped receipt-ok-1-{SECRET}"
    events = await get_events_async("ok-1", settings=wf)
    charge = [e for e in events if isinstance(e, (StepCompleted, StepFailed)) and e.step == "shop.charge"]
    assert [(type(e).__name__, e.attempt) for e in charge] == [
        ("StepFailed", 1), ("StepFailed", 2), ("StepCompleted", 3),
    ]  # fmt: skip
    assert isinstance(events[0], RunStarted) and any(isinstance(e, RunPaused) for e in events)
    assert [e.token for e in events if isinstance(e, HookReceived)] == ["approve:ok-1"]
    run = await get_run_async("ok-1", settings=wf)
    assert (run.status, run.last_step, run.attempts) == ("completed", "shop.ship", 1)


async def test_unknown_runs_raise_run_not_found(wf: Settings) -> None:
    for query in (get_run_async, get_events_async, resume_async):
        with pytest.raises(RunNotFoundError, match="no run 'ghost'") as info:
            await query("ghost", settings=wf)
        assert isinstance(info.value, LookupError) and info.value.run_id == "ghost"


async def test_list_runs_pages_newest_first_and_filters(wf: Settings) -> None:
    for i in range(7):
        await start_async(twice.options(run_id=f"q-{i}", settings=wf), i)
    await run_checkout(wf, "bad-2")
    everything = await list_runs_async(settings=wf)
    assert [r.run_id for r in everything.runs] == ["bad-2", *[f"q-{i}" for i in reversed(range(7))]]
    assert everything.cursor is None
    pages, cursor = [], None
    while True:
        page = await list_runs_async(limit=3, cursor=cursor, settings=wf)
        pages.append([r.run_id for r in page.runs])
        cursor = page.cursor
        if cursor is None:
            break
    assert [run for page in pages for run in page] == [r.run_id for r in everything.runs]
    assert all(len(page) <= 3 for page in pages)
    failed = await list_runs_async(status="failed", settings=wf)
    assert [(r.run_id, r.status) for r in failed.runs] == [("bad-2", "failed")]
    mine = await list_runs_async(workflow="q.twice", limit=100, settings=wf)
    assert {r.run_id for r in mine.runs} == {f"q-{i}" for i in range(7)}
    assert {r.workflow for r in mine.runs} == {"q.twice"}


async def test_list_runs_pages_through_runs_created_in_one_millisecond(wf: Settings) -> None:
    store = await open_store(wf)
    # 450 runs sharing one creation time: more than a batch, so the cursor must order by ID too.
    await store.client.zadd(store.runs_key, {f"same-{i:03d}": 1_700_000_000_000 for i in range(450)})
    for i in range(450):
        await store.client.hset(store.key(f"same-{i:03d}", "state"), mapping={"status": "pending", "workflow": "x"})
    seen: list[str] = []
    cursor = None
    while True:
        page = await list_runs_async(limit=40, cursor=cursor, settings=wf)
        seen += [r.run_id for r in page.runs]
        if page.cursor is None:
            break
        cursor = page.cursor
    assert seen == [f"same-{i:03d}" for i in reversed(range(450))]


async def test_list_runs_refuses_bad_arguments(wf: Settings) -> None:
    with pytest.raises(ConfigurationError, match="unknown run status 'done'"):
        await list_runs_async(status="done", settings=wf)
    with pytest.raises(ConfigurationError, match="limit must be at least 1"):
        await list_runs_async(limit=0, settings=wf)
    with pytest.raises(ConfigurationError, match="invalid cursor"):
        await list_runs_async(cursor="garbage", settings=wf)


async def test_a_blocking_query_inside_an_event_loop_names_its_async_twin(wf: Settings) -> None:
    with pytest.raises(ConfigurationError, match=r"get_run\(\) cannot be called inside a running event loop"):
        get_run("q-1", settings=wf)


async def test_resume_puts_a_failed_run_back_on_the_queue(wf: Settings) -> None:
    await run_checkout(wf, "bad-3")
    store = await open_store(wf)
    before = await store.client.xlen(store.queue_key("queue"))
    assert await resume_async("bad-3", settings=wf) == "failed"
    entries = cast("list[Any]", await store.client.xrange(store.queue_key("queue")))
    assert len(entries) == before + 1 and entries[-1][1][b"r"] == b"bad-3"
    await start_async(twice.options(run_id="q-done", settings=wf), 1)
    with pytest.raises(RunConflictError, match="'q-done' is completed: there is nothing to resume") as refused:
        await resume_async("q-done", settings=wf)
    assert refused.value.run_id == "q-done"


async def test_dead_letters_are_listed_typed_and_redriven_and_the_queue_depth_counts_messages(wf: Settings) -> None:
    from werkfluss._store._keys import GROUP as WORKERS  # the group the workers read as

    assert await dead_letters_async(settings=wf) == []
    store = await open_store(wf)
    await store.ensure_group(WORKERS)
    assert await queue_depth_async(settings=wf) == werkfluss.QueueDepth(waiting=0, in_flight=0)
    await store.client.xadd(store.queue_key("queue"), {"r": "some-run"})
    await store.client.xadd(store.queue_key("queue"), {"r": "other-run"})
    assert await queue_depth_async(settings=wf) == werkfluss.QueueDepth(waiting=2, in_flight=0)
    [(message, _), _] = await store.read_queue(WORKERS, "q-test", 2, 0.1)
    assert await queue_depth_async(settings=wf) == werkfluss.QueueDepth(waiting=0, in_flight=2)
    before = datetime.now(UTC) - timedelta(seconds=5)
    await store.dead_letter(WORKERS, message, "some-run", "poison (test)")
    [letter] = await dead_letters_async(settings=wf)
    assert (letter.run_id, letter.reason, letter.deliveries, letter.source) == ("some-run", "poison (test)", 1, None)
    assert letter.at is not None and letter.at > before
    assert letter.fields["r"] == "some-run"
    assert await queue_depth_async(settings=wf) == werkfluss.QueueDepth(waiting=0, in_flight=1)
    again = await redrive_async(letter.id, settings=wf)
    assert again is not None and await dead_letters_async(settings=wf) == []
    assert await queue_depth_async(settings=wf) == werkfluss.QueueDepth(waiting=1, in_flight=1)
    assert await redrive_async(letter.id, settings=wf) is None  # gone: nothing re-driven twice


async def test_events_carry_no_secret_into_logs_above_debug(wf: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="werkfluss")
    await run_checkout(wf, "ok-2")
    await run_checkout(wf, "bad-4")
    records = [r for r in caplog.records if r.name.startswith("werkfluss")]
    assert not [r.getMessage() for r in records if SECRET in r.getMessage()]
    kinds = {getattr(r, "werkfluss_event", None) for r in records}
    assert {"run.started", "run.paused", "run.resumed", "run.completed", "run.failed", "step.executed",
            "step.replayed", "step.retrying", "step.failed"} <= kinds  # fmt: skip
    by_event = {getattr(r, "werkfluss_event", None): r for r in records}
    assert by_event["run.failed"].levelno == logging.WARNING
    assert by_event["step.retrying"].levelno == logging.INFO
    assert by_event["step.executed"].levelno == logging.DEBUG
    failure = [r for r in records if getattr(r, "werkfluss_event", None) == "run.failed"][-1]
    assert failure.werkfluss_run == "bad-4"  # type: ignore[attr-defined]
    assert not any(isinstance(e, RunFailed) for e in await get_events_async("ok-2", settings=wf))


async def test_a_rerun_of_a_completed_run_logs_a_structured_record(
    wf: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    first = await run_checkout(wf, "ok-rerun")
    caplog.set_level(logging.INFO, logger="werkfluss")
    assert await start_async(checkout.options(run_id="ok-rerun", settings=wf), "ok-rerun") == first
    [record] = [r for r in caplog.records if getattr(r, "werkfluss_event", None) == "run.recorded"]
    assert record.werkfluss_run == "ok-rerun"  # type: ignore[attr-defined]
    assert "is complete: returning its recorded result" in record.getMessage()


async def test_listing_and_redriving_refuse_bad_arguments_by_name(wf: Settings) -> None:
    for limit in (0, -1, 1.5, None, True):
        with pytest.raises(ConfigurationError, match=rf"limit must be at least 1.*, got {re.escape(repr(limit))}"):
            await dead_letters_async(limit=limit, settings=wf)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="limit must be at least 1"):
            await werkfluss.pending_hooks_async(limit=limit, settings=wf)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="limit must be at least 1"):
            await list_runs_async(limit=limit, settings=wf)  # type: ignore[arg-type]
    for bad in ("garbage", "1-", "-1", 5):
        with pytest.raises(ConfigurationError, match=f"{bad!r} is not a dead letter ID"):
            await redrive_async(bad, settings=wf)  # type: ignore[arg-type]
    assert await redrive_async("1-1", settings=wf) is None  # well formed, just not there
    with pytest.raises(ConfigurationError, match="the worker has not started"):
        werkfluss.Worker(settings=wf).store  # noqa: B018
