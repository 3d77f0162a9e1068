"""What a worker does with messages that are not a plain first delivery: extra wake-ups
for a run it is executing, bytes that are not text, payloads that do not decode."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import anyio
import msgspec
import pytest

from werkfluss import Worker, enqueue_async, hook, invoke_hook_async, step, workflow
from werkfluss._store._open import open_store

from .helpers import until_all

if TYPE_CHECKING:
    from werkfluss import Settings

executions: Counter[str] = Counter()
RESET = (executions,)  # What conftest's `wf` clears before each test.


@step(name="wm.slow")
async def slow(i: int) -> int:
    executions[f"slow-{i}"] += 1
    await anyio.sleep(0.3)
    return i


@workflow(name="wm.three")
async def three() -> int:
    return await slow(1) + await slow(2) + await slow(3)


async def test_wake_ups_for_a_run_the_worker_executes_do_not_start_a_second_execution(
    wf: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store(wf)
    run_id = await enqueue_async(three.options(settings=wf, run_id="busy-run"))
    async with Worker(settings=wf, concurrency=8):
        with anyio.fail_after(10):
            while executions["slow-1"] == 0:
                await anyio.sleep(0.01)
        for _ in range(20):  # hook deliveries and timers wake runs like this, any time
            await store.client.xadd(store.queue_key("queue"), {"r": run_id})
        await until_all(wf, [run_id])
    assert executions == {"slow-1": 1, "slow-2": 1, "slow-3": 1}
    assert msgspec.msgpack.decode((await store.state(run_id)).result or b"") == 6
    assert not [r for r in caplog.records if "taken over" in r.getMessage()]


async def test_a_message_that_is_not_text_is_dead_lettered_and_the_queue_moves_on(wf: Settings) -> None:
    store = await open_store(wf)
    await store.ensure_group("workers")
    await store.client.xadd(store.queue_key("queue"), {b"r": b"\xc6\xff\xfe", b"\xff": b"\x80"})
    after = await enqueue_async(three.options(settings=wf, run_id="after-junk"))
    async with Worker(settings=wf):
        await until_all(wf, [after])
        with anyio.fail_after(10):
            while not await store.dead_letters(10):
                await anyio.sleep(0.02)
    [(_, fields)] = await store.dead_letters(10)
    assert fields["reason"] == "there is no run '\ufffd\ufffd\ufffd'"  # the bytes, as text, name no run


@workflow(name="wm.inbox")
async def inbox() -> int:
    return await hook("wm-inbox", type=int) * 2


async def test_a_payload_that_does_not_decode_is_dead_lettered_and_the_run_waits_on(
    wf: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store(wf)
    run_id = await enqueue_async(inbox.options(settings=wf, run_id="inbox-run"))
    async with Worker(settings=wf):
        await until_all(wf, [run_id], "paused")
        await store.client.xadd(store.hook_key("wm-inbox", "box"), {"p": msgspec.msgpack.encode("not an int")})
        await store.client.xadd(store.hook_key("wm-inbox", "box"), {"other": "field"})
        await store.wake(run_id)
        with anyio.fail_after(10):
            while len(await store.dead_letters(10)) < 2:
                await anyio.sleep(0.02)
        assert await store.status(run_id) in ("paused", "running")
        await invoke_hook_async("wm-inbox", 21, settings=wf)
        await until_all(wf, [run_id])
    assert msgspec.msgpack.decode((await store.state(run_id)).result or b"") == 42
    letters = [fields for _, fields in await store.dead_letters(10)]
    assert [f["r"] for f in letters] == [run_id, run_id]
    assert all(f["source"].startswith("hook wm-inbox entry ") for f in letters)
    assert "does not decode as int" in letters[0]["reason"] and "no payload field" in letters[1]["reason"]
    assert [r.levelname for r in caplog.records if getattr(r, "werkfluss_event", "") == "hook.rejected"] == [
        "WARNING", "WARNING",
    ]  # fmt: skip
