"""Hook deliveries with a delivery key (``invoke_hook(token, payload, key=...)``), on both
servers: a sender's retry stores nothing, before the run takes the payload, after it did,
after the run completed, and when ten real processes deliver the same key at once."""

from __future__ import annotations

import asyncio
import functools
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest

from werkfluss import (
    ConfigurationError,
    HookClosedError,
    Settings,
    expire_hooks_async,
    hook,
    invoke_hook,
    invoke_hook_async,
    pending_hooks_async,
    start_async,
    workflow,
)
from werkfluss._events import HookReceived
from werkfluss._store._hooks import DELIVER
from werkfluss._store._open import open_store

from .helpers import WERKFLUSS, events

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable

    from .conftest import Server

SENDERS = 10


@pytest.fixture
def wf(wf: Settings) -> Settings:
    return msgspec.structs.replace(wf, hold=0.05)  # timers this far off pause the run


@workflow(name="hookkeys.single")
async def single(token: str) -> Any:
    return await hook(token=token)


@workflow(name="hookkeys.gather")
async def gather(token: str, count: int) -> list[Any]:
    got = []
    async for payload in hook(token=token):
        got.append(payload)
        if len(got) == count:
            break
    return got


async def until(what: str, check: Callable[[], Any], timeout: float = 20) -> None:
    deadline = anyio.current_time() + timeout
    while not await check():
        if anyio.current_time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(0.01)


async def until_status(settings: Settings, run_id: str, wanted: str) -> None:
    store = await open_store(settings)
    await until(f"run {run_id} {wanted}", lambda: _status_is(store, run_id, wanted))


async def _status_is(store: Any, run_id: str, wanted: str) -> bool:
    return bool(await store.status(run_id) == wanted)


async def box(settings: Settings, token: str) -> int:
    store = await open_store(settings)
    return int(await store.client.xlen(store.hook_key(token, "box")))


async def taken(settings: Settings, run_id: str) -> list[Any]:
    return [e for e in await events(settings, run_id) if isinstance(e, HookReceived)]


def report(title: str, **figures: Any) -> None:
    print(f"\n[{title}] " + " ".join(f"{k}={v}" for k, v in figures.items()))


# -- the same key twice ------------------------------------------------------------------------------------------------


async def test_the_same_key_twice_before_the_run_reaches_the_hook_stores_one_payload(wf: Settings) -> None:
    token = "order-paid:1"
    assert await invoke_hook_async(token, "first", key="evt-123", settings=wf) is True
    assert await invoke_hook_async(token, "second", key="evt-123", settings=wf) is False
    assert [(h.token, h.payloads) for h in await pending_hooks_async(settings=wf)] == [(token, 1)]
    assert await start_async(single.options(settings=wf, run_id="early"), token) == "first"
    assert await box(wf, token) == 0 and await pending_hooks_async(settings=wf) == []
    assert [e.n for e in await taken(wf, "early")] == [1]


async def test_the_same_key_after_the_run_took_the_first_payload_is_not_a_second_payload(wf: Settings) -> None:
    token = "order-paid:2"
    task = asyncio.create_task(start_async(gather.options(settings=wf, run_id="iterating"), token, 2))
    await until_status(wf, "iterating", "paused")
    assert await invoke_hook_async(token, "first", key="evt-1", settings=wf) is True

    store = await open_store(wf)

    async def first_taken() -> bool:
        # Taken: recorded, out of the mailbox, and (the run's next write) out of the index.
        return (
            len(await taken(wf, "iterating")) == 1
            and await box(wf, token) == 0
            and await store.client.zscore(store.hooks_key, token) is None
        )

    await until("the first payload to be taken", first_taken)
    assert await invoke_hook_async(token, "again", key="evt-1", settings=wf) is False  # the sender retried
    assert await box(wf, token) == 0 and await pending_hooks_async(settings=wf) == []
    assert await store.client.zscore(store.hooks_key, token) is None  # not listed again, so never expired for it
    assert await invoke_hook_async(token, "next", key="evt-2", settings=wf) is True
    with anyio.fail_after(20):
        assert await task == ["first", "next"]
    assert [e.n for e in await taken(wf, "iterating")] == [1, 2]

    # After the run completed, a retry of a delivery it had is still a no-op, not an error;
    # a new delivery (keyed or not) is refused and creates no key.
    assert await invoke_hook_async(token, "late retry", key="evt-2", settings=wf) is False
    keys_before = await store.client.hgetall(store.hook_key(token, "keys"))
    with pytest.raises(HookClosedError):
        await invoke_hook_async(token, "new", key="evt-3", settings=wf)
    with pytest.raises(HookClosedError):
        await invoke_hook_async(token, "new", settings=wf)
    assert await store.client.hgetall(store.hook_key(token, "keys")) == keys_before
    assert set(keys_before) == {b"evt-1", b"evt-2"}


async def test_a_retried_key_whose_payload_the_run_took_wakes_nothing(wf: Settings) -> None:
    # Each retry used to wake the parked run too: a resume and a pause in its log per retry,
    # counting toward max_history, for a payload it had already.
    token = "order-paid:retried"
    task = asyncio.create_task(start_async(gather.options(settings=wf, run_id="retried"), token, 2))
    await until_status(wf, "retried", "paused")
    assert await invoke_hook_async(token, "first", key="evt-1", settings=wf) is True

    async def parked_again() -> bool:
        store = await open_store(wf)
        return len(await taken(wf, "retried")) == 1 and await store.status("retried") == "paused"

    await until("the run to take the payload and park again", parked_again)
    before = len(await events(wf, "retried"))
    for _ in range(3):
        assert await invoke_hook_async(token, "again", key="evt-1", settings=wf) is False
    store = await open_store(wf)
    assert await store.due(["retried"]) == [None]  # nothing woke it
    assert len(await events(wf, "retried")) == before
    assert await invoke_hook_async(token, "second", key="evt-2", settings=wf) is True
    with anyio.fail_after(20):
        assert await task == ["first", "second"]


async def test_a_single_shot_hook_parked_on_a_repeated_key_takes_it_once(wf: Settings) -> None:
    token = "order-paid:3"
    task = asyncio.create_task(start_async(single.options(settings=wf, run_id="parked"), token))
    await until_status(wf, "parked", "paused")
    stored = await anyio.to_thread.run_sync(lambda: invoke_hook(token, {"n": 1}, key="evt-9", settings=wf))
    assert stored is True  # the blocking twin
    assert await invoke_hook_async(token, {"n": 2}, key="evt-9", settings=wf) is False
    with anyio.fail_after(20):
        assert await task == {"n": 1}
    assert len(await taken(wf, "parked")) == 1 and await box(wf, token) == 0


# -- many senders at once ----------------------------------------------------------------------------------------------

SENDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from werkfluss import invoke_hook

    me, token, barrier = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    (barrier / f"ready-{me}").touch()
    deadline = time.monotonic() + 60
    while not (barrier / "go").exists():  # every sender delivers at the same moment
        if time.monotonic() > deadline:
            sys.exit("no go")
        time.sleep(0.001)
    began = time.time()
    stored = invoke_hook(token, f"from-{me}", key="evt-123")
    print(f"{stored} {began}")
    """
)


@pytest.mark.parametrize("waiting", ["single-shot", "iterating"])
async def test_ten_processes_delivering_the_same_key_at_once_store_one_payload(
    wf: Settings, tmp_path: Path, run_script: Callable[..., subprocess.Popen[str]], waiting: str
) -> None:
    token = f"order-paid:{waiting}"
    run_id = f"parked-{waiting}"
    if waiting == "single-shot":
        task = asyncio.create_task(start_async(single.options(settings=wf, run_id=run_id), token))
    else:  # the run takes two payloads: the one the senders stored, then "end"
        task = asyncio.create_task(start_async(gather.options(settings=wf, run_id=run_id), token, 2))
    await until_status(wf, run_id, "paused")
    script = tmp_path / "sender.py"
    script.write_text(SENDER)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    senders = [run_script(script, str(n), token, str(barrier)) for n in range(SENDERS)]

    async def all_ready() -> bool:
        return len(list(barrier.glob("ready-*"))) == SENDERS or any(p.poll() is not None for p in senders)

    await until("every sender to be ready", all_ready, timeout=60)
    (barrier / "go").touch()
    outputs = [await anyio.to_thread.run_sync(functools.partial(p.communicate, timeout=60)) for p in senders]
    assert all(p.returncode == 0 for p in senders), [err for _, err in outputs]
    replies = [(n, out.split()) for n, (out, _) in enumerate(outputs)]
    winners = [n for n, (stored, _) in replies if stored == "True"]
    assert len(winners) == 1 and sum(stored == "False" for _, (stored, _) in replies) == SENDERS - 1, replies
    if waiting == "iterating":
        assert await invoke_hook_async(token, "end", key="evt-end", settings=wf) is True
    with anyio.fail_after(30):
        result = await task
    expected = f"from-{winners[0]}"
    assert result == (expected if waiting == "single-shot" else [expected, "end"])
    consumed = len(await taken(wf, run_id))
    assert consumed == (1 if waiting == "single-shot" else 2) and await box(wf, token) == 0
    starts = [float(began) for _, (_, began) in replies]
    report(
        f"hook key, {SENDERS} concurrent senders, {waiting}",
        stored=len(winners),
        duplicates=SENDERS - len(winners),
        consumptions_of_the_key=sum(
            str(p).startswith("from-") for p in (result if isinstance(result, list) else [result])
        ),
        call_start_spread_ms=round((max(starts) - min(starts)) * 1000, 1),
    )


# -- without the same key ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [("evt-a", "evt-b"), (None, None)], ids=["different-keys", "no-key"])
async def test_different_keys_or_no_key_keep_every_delivery(wf: Settings, keys: tuple[str | None, str | None]) -> None:
    token = f"order-paid:{keys[0]}"
    for key in keys:
        assert await invoke_hook_async(token, "same payload", key=key, settings=wf) is True
    assert [(h.token, h.payloads) for h in await pending_hooks_async(settings=wf)] == [(token, 2)]
    assert await start_async(gather.options(settings=wf, run_id="both"), token, 2) == ["same payload"] * 2
    assert [e.n for e in await taken(wf, "both")] == [1, 2]


# -- what a key is, and how long it is remembered ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "k" * 257, 123, b"evt-1"], ids=["empty", "too-long", "int", "bytes"])
async def test_a_bad_key_is_a_configuration_error_naming_it(wf: Settings, key: Any) -> None:
    with pytest.raises(ConfigurationError) as raised:
        await invoke_hook_async("order-paid:bad", "x", key=key, settings=wf)
    assert repr(key)[:40] in str(raised.value) and "delivery key" in str(raised.value)
    assert await pending_hooks_async(settings=wf) == []  # nothing stored
    assert await invoke_hook_async("order-paid:bad", "x", key="k" * 256, settings=wf) is True  # the cap itself


async def test_keys_are_forgotten_with_the_mailbox_when_it_expires(wf: Settings) -> None:
    token = "nobody:claims-this"
    assert await invoke_hook_async(token, 1, key="evt-1", settings=wf) is True
    assert await invoke_hook_async(token, 1, key="evt-1", settings=wf) is False
    store = await open_store(wf)

    async def old_enough() -> bool:  # expire_hooks compares delivery times in milliseconds
        return await expire_hooks_async(0, settings=wf) == [token]

    await until("the mailbox to expire", old_enough)
    assert await store.client.exists(*(store.hook_key(token, part) for part in ("box", "meta", "keys"))) == 0
    assert await invoke_hook_async(token, 2, key="evt-1", settings=wf) is True  # a new delivery, as documented


async def test_a_delivery_re_sent_after_a_lost_reply_reports_stored_not_duplicate(wf: Settings) -> None:
    # redis-py re-sends a command whose reply was lost: the same call's nonce finds its own write.
    store = await open_store(wf)
    token = "order-paid:resent"
    keys = [store.hook_key(token, part) for part in ("box", "meta", "keys")]
    first = await store._run(DELIVER, keys, [b"\xa1x", "evt-7", "nonce-a"])
    again = await store._run(DELIVER, keys, [b"\xa1x", "evt-7", "nonce-a"])
    other = await store._run(DELIVER, keys, [b"\xa1x", "evt-7", "nonce-b"])
    # Another call's: nothing stored; "waiting" while the first payload is still in the mailbox.
    assert [r[2] for r in (first, again, other)] == [b"stored", b"stored", b"waiting"]
    assert first[0] == again[0] == other[0] and await box(wf, token) == 1


# -- the command line --------------------------------------------------------------------------------------------------


async def test_the_cli_hooks_send_key_stores_a_retried_delivery_once(wf: Settings, server: Server, prefix: str) -> None:
    env = {**os.environ, **server.env, "WERKFLUSS_PREFIX": prefix}
    env.pop("WERKFLUSS_REDIS_URL" if server.kind == "valkey" else "WERKFLUSS_DIR", None)

    async def send(*extra: str) -> tuple[int, str]:
        done = await anyio.run_process([WERKFLUSS, "hooks", "send", "cli-key", *extra], env=env, check=False)
        return done.returncode, (done.stdout.decode() + done.stderr.decode()).strip()

    assert await send('{"ok": true}', "--key", "evt-1") == (0, "delivered to hook 'cli-key'")
    code, text = await send('{"ok": false}', "--key", "evt-1")
    assert code == 0 and "already has the delivery with key 'evt-1': nothing stored" in text
    assert [(h.token, h.payloads) for h in await pending_hooks_async(settings=wf)] == [("cli-key", 1)]
    code, text = await send("1", "--key", "")
    assert code == 1 and "invalid hook delivery key ''" in text and "Traceback" not in text
    assert await start_async(single.options(settings=wf, run_id="cli"), "cli-key") == {"ok": True}
