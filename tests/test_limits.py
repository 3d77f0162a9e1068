"""Payload and history limits: refused before anything is written, named clearly."""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from werkfluss import (
    HistoryTooLargeError,
    PayloadTooLargeError,
    RunNotFoundError,
    Settings,
    StepFailedError,
    get_run_async,
    invoke_hook_async,
    pending_hooks_async,
    start_async,
    step,
    workflow,
)
from werkfluss._store._open import close_stores
from werkfluss.events import StepFailed

from .helpers import events

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

calls: Counter[str] = Counter()
KIB = 1024


@pytest.fixture
async def small(settings: Settings) -> AsyncIterator[Settings]:
    calls.clear()
    yield Settings(**{**{f: getattr(settings, f) for f in settings.__struct_fields__}, "max_payload": 64 * KIB})
    await close_stores()


@step(name="lim.store")
async def store_blob(name: str, blob: bytes, note: str = "") -> int:
    calls["store"] += 1
    return len(blob)


@step(name="lim.render")
async def render(size: int) -> str:
    calls["render"] += 1
    return "x" * size


@workflow(name="lim.upload")
async def upload(size: int) -> int:
    return await store_blob("a", b"\0" * size, note="small")


@workflow(name="lim.report")
async def report(size: int) -> str:
    return await render(size)


@workflow(name="lim.echo")
async def echo(blob: bytes) -> int:
    return len(blob)


async def test_a_workflow_argument_over_the_limit_writes_nothing(small: Settings) -> None:
    with pytest.raises(PayloadTooLargeError, match=r"lim\.echo: the arguments \(largest: argument 0\): 6") as info:
        await start_async(echo.options(run_id="big-args", settings=small), b"\0" * (65 * KIB))
    assert info.value.limit == 64 * KIB and info.value.size > 65 * KIB
    assert "Settings.max_payload" in str(info.value)
    with pytest.raises(RunNotFoundError):
        await get_run_async("big-args", settings=small)
    assert await start_async(echo.options(run_id="ok-args", settings=small), b"\0" * (60 * KIB)) == 60 * KIB


async def test_a_step_argument_over_the_limit_fails_before_the_step_runs(small: Settings) -> None:
    with pytest.raises(PayloadTooLargeError, match=r"lim\.store: the arguments \(largest: argument 1\)"):
        await start_async(upload.options(run_id="big-step", settings=small), 100 * KIB)
    assert calls["store"] == 0
    assert not [e for e in await events(small, "big-step") if type(e).__name__.startswith("Step")]


async def test_a_result_over_the_limit_fails_the_step_without_retries(small: Settings) -> None:
    # A step failure (StepFailedError, as on every replay), carrying the PayloadTooLargeError.
    with pytest.raises(StepFailedError, match=r"lim\.render: result: 102,405 bytes encoded") as info:
        await start_async(report.options(run_id="big-result", settings=small), 100 * KIB)
    assert isinstance(info.value.original, PayloadTooLargeError)
    assert calls["render"] == 1
    failed = [e for e in await events(small, "big-result") if isinstance(e, StepFailed)]
    assert [(e.attempt, e.final, e.error.type) for e in failed] == [(1, True, "werkfluss.PayloadTooLargeError")]
    run = await get_run_async("big-result", settings=small)
    assert run.status == "failed"


async def test_a_hook_payload_over_the_limit_is_not_delivered(small: Settings) -> None:
    with pytest.raises(PayloadTooLargeError, match="hook 'fat': payload: 66,565 bytes"):
        await invoke_hook_async("fat", "y" * (65 * KIB), settings=small)
    assert await pending_hooks_async(settings=small) == []


@step(name="lim.tick")
async def tick(i: int) -> int:
    calls["tick"] += 1
    return i


@workflow(name="lim.loop")
async def loop(n: int) -> int:
    total = 0
    for i in range(n):
        total += await tick(i)
    return total


async def test_history_warns_once_then_fails_at_the_cap_and_resumes_when_raised(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    calls.clear()
    caplog.set_level(logging.WARNING, logger="werkfluss")
    base = {f: getattr(settings, f) for f in settings.__struct_fields__}
    tight = Settings(**{**base, "history_warning": 5, "max_history": 12})
    with pytest.raises(HistoryTooLargeError) as info:
        await start_async(loop.options(run_id="long", settings=tight), 30)
    assert (info.value.run_id, info.value.events, info.value.limit) == ("long", 12, 12)
    assert "run 'long' has 12 events in its log, the limit is 12" in str(info.value)
    warnings = [r for r in caplog.records if getattr(r, "werkfluss_event", "") == "run.history"]
    assert len(warnings) == 1 and "has 5 events" in warnings[0].getMessage()
    assert calls["tick"] == 11  # the 12th event would have been the 12th completion: refused
    run = await get_run_async("long", settings=tight)
    assert run.status == "failed" and run.error is not None and run.error.type == "werkfluss.HistoryTooLargeError"

    roomy = Settings(**{**base, "max_history": 100})
    assert await start_async(loop.options(run_id="long", settings=roomy), 30) == sum(range(30))
    assert calls["tick"] == 30  # each step executed once across both runs
    await close_stores()


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WERKFLUSS_MAX_PAYLOAD", "2048")
    monkeypatch.setenv("WERKFLUSS_MAX_HISTORY", "99")
    monkeypatch.setenv("WERKFLUSS_HISTORY_WARNING", "50")
    got = Settings.from_env()
    assert (got.max_payload, got.max_history, got.history_warning) == (2048, 99, 50)
    monkeypatch.setenv("WERKFLUSS_MAX_HISTORY", "lots")
    from werkfluss import ConfigurationError

    with pytest.raises(ConfigurationError, match="WERKFLUSS_MAX_HISTORY must be a whole number, got 'lots'"):
        Settings.from_env()
