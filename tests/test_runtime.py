"""Runs on real servers: replay, typed results, retries, non-determinism, fencing."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import decimal
import enum
import shutil
import socket
import subprocess
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any, cast

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from werkfluss import (
    NonDeterminismError,
    RetryPolicy,
    RunConflictError,
    SerializationError,
    Settings,
    StepFailedError,
    StorageError,
    start_async,
    step,
    step_key,
    workflow,
)
from werkfluss._events import RunResumed, StepCompleted, StepFailed, encode_event
from werkfluss._store._open import close_stores, open_store

from .conftest import wait_for
from .helpers import events, status

if TYPE_CHECKING:
    from collections.abc import Iterator

calls: Counter[str] = Counter()
RESET = (calls,)  # What conftest's `wf` clears before each test.


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Invoice:
    id: uuid.UUID
    amount: decimal.Decimal
    due: datetime.datetime
    color: Color
    lines: list[tuple[str, int]]


INVOICE = Invoice(
    uuid.UUID(int=7),
    decimal.Decimal("12.50"),
    datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
    Color.RED,
    [("a", 1), ("b", 2)],
)

fail_at_end = {"on": True}


@step
async def make_invoice(customer: str) -> Invoice:
    calls["make_invoice"] += 1
    return INVOICE


@step
async def total(inv: Invoice) -> decimal.Decimal:
    calls["total"] += 1
    return inv.amount * 2


@workflow
async def billing(customer: str) -> str:
    inv = await make_invoice(customer)
    assert isinstance(inv, Invoice)
    doubled = await total(inv)
    if fail_at_end["on"]:
        raise RuntimeError("crash after the steps")
    return f"{inv.due.isoformat()} {inv.amount} {doubled} {inv.id}"


async def test_rerun_replays_recorded_results_with_their_types(wf: Settings) -> None:
    fail_at_end["on"] = True
    with pytest.raises(RuntimeError, match="crash after the steps"):
        await start_async(billing.options(settings=wf, run_id="inv-1"), "acme")
    assert calls == {"make_invoice": 1, "total": 1}
    fail_at_end["on"] = False
    result = await start_async(billing.options(settings=wf, run_id="inv-1"), "acme")
    assert result == "2026-01-02T03:04:05-05:00 12.50 25.00 00000000-0000-0000-0000-000000000007"
    assert calls == {"make_invoice": 1, "total": 1}  # nothing re-executed
    assert await status(wf, "inv-1") == "completed"
    # Completed: attaching again returns the stored result and executes nothing.
    assert await start_async(billing.options(settings=wf, run_id="inv-1"), "acme") == result
    assert calls == {"make_invoice": 1, "total": 1}


async def test_replayed_dataclass_equals_the_original(wf: Settings) -> None:
    seen: list[Invoice] = []

    @workflow
    async def keep(customer: str) -> int:
        seen.append(await make_invoice(customer))
        if len(seen) == 1:
            raise RuntimeError("first time")
        return 1

    with pytest.raises(RuntimeError):
        await start_async(keep.options(settings=wf), "x")
    assert await start_async(keep.options(settings=wf), "x") == 1
    assert seen[1] == INVOICE and seen[1] is not INVOICE
    assert seen[1].due.utcoffset() == datetime.timedelta(hours=-5)
    assert str(seen[1].amount) == "12.50"


async def test_derived_run_id_reaches_the_same_run(wf: Settings) -> None:
    @workflow
    async def hello(name: str, *, loud: bool = False) -> str:
        calls["hello"] += 1
        return name.upper() if loud else name

    assert await start_async(hello.options(settings=wf), "ann", loud=True) == "ANN"
    assert await start_async(hello.options(settings=wf), "ann", loud=True) == "ANN"
    assert calls["hello"] == 1
    assert await start_async(hello.options(settings=wf), "bob") == "bob"
    assert calls["hello"] == 2


order: dict[str, Any] = {"variant": "original"}


@step
async def step_a() -> str:
    calls["a"] += 1
    return "a"


@step
async def step_b() -> str:
    calls["b"] += 1
    return "b"


@step
async def step_x() -> str:
    calls["x"] += 1
    return "x"


@workflow
async def changing() -> str:
    if order["variant"] == "inserted":
        await step_a()
        await step_x()
        await step_b()
    else:
        await step_a()
        await step_b()
        if order["variant"] == "appended":
            await step_x()
    if order.get("fail"):
        raise RuntimeError("interrupted")
    return "+".join(sorted(calls))


async def test_inserted_step_raises_non_determinism_and_blocks_the_run(wf: Settings) -> None:
    order.update(variant="original", fail=True)
    with pytest.raises(RuntimeError):
        await start_async(changing.options(settings=wf, run_id="nd"))
    order.update(variant="inserted", fail=False)
    with pytest.raises(NonDeterminismError) as info:
        await start_async(changing.options(settings=wf, run_id="nd"))
    message = str(info.value)
    assert "'nd'" in message and "#2" in message
    assert "test_runtime:step_b" in message and "test_runtime:step_x" in message
    assert (info.value.seq, info.value.recorded, info.value.called) == (2, step_b.id, step_x.id)
    assert calls == {"a": 1, "b": 1}  # nothing executed past the divergence
    assert await status(wf, "nd") == "blocked"
    order.update(variant="original")  # the fixed deploy resumes the run
    assert await start_async(changing.options(settings=wf, run_id="nd")) == "a+b"
    assert calls == {"a": 1, "b": 1}


async def test_step_appended_at_the_end_just_runs(wf: Settings) -> None:
    order.update(variant="original", fail=True)
    with pytest.raises(RuntimeError):
        await start_async(changing.options(settings=wf, run_id="app"))
    order.update(variant="appended", fail=False)
    assert await start_async(changing.options(settings=wf, run_id="app")) == "a+b+x"
    assert calls == {"a": 1, "b": 1, "x": 1}


async def test_retries_record_each_failure_and_keep_the_step_key(wf: Settings) -> None:
    keys: list[str] = []

    @step(retries=RetryPolicy(retries=2, base=0.01))
    async def flaky() -> int:
        keys.append(step_key())
        if len(keys) < 3:
            raise ConnectionError(f"attempt {len(keys)}")
        return len(keys)

    @workflow
    async def uses_flaky() -> int:
        return await flaky()

    assert await start_async(uses_flaky.options(settings=wf, run_id="retry")) == 3
    assert keys == ["retry:1"] * 3
    log = await events(wf, "retry")
    failed = [e for e in log if isinstance(e, StepFailed)]
    assert [(e.attempt, e.final, e.error.type) for e in failed] == [
        (1, False, "ConnectionError"),
        (2, False, "ConnectionError"),
    ]
    assert all(e.retry_at is not None for e in failed)
    assert [e.attempt for e in log if isinstance(e, StepCompleted)] == [3]


async def test_exhausted_retries_fail_the_run_and_a_rerun_resumes_at_that_step(wf: Settings) -> None:
    broken = {"on": True}

    @step(retries=RetryPolicy(retries=1, base=0))
    async def charge(amount: int) -> str:
        calls["charge"] += 1
        if broken["on"]:
            raise ValueError(f"card declined for {amount}")
        return "paid"

    @workflow
    async def checkout(amount: int) -> str:
        await step_a()
        return await charge(amount)

    with pytest.raises(StepFailedError) as info:
        await start_async(checkout.options(settings=wf, run_id="co"), 5)
    err = info.value
    assert err.error_type == "ValueError" and err.error_message == "card declined for 5"
    assert err.attempts == 2 and err.seq == 2 and err.step_id == charge.id
    assert isinstance(err.original, ValueError)
    assert "charge" in str(err) and "ValueError: card declined for 5" in str(err)
    assert "Traceback" in err.traceback
    assert await status(wf, "co") == "failed"
    assert calls == {"a": 1, "charge": 2}
    broken["on"] = False
    assert await start_async(checkout.options(settings=wf, run_id="co"), 5) == "paid"
    assert calls == {"a": 1, "charge": 3}  # only the failed step ran again


async def test_a_caught_step_failure_replays_as_a_failure(wf: Settings) -> None:
    @step
    async def always_fails() -> None:
        calls["fails"] += 1
        raise KeyError("nope")

    @workflow
    async def tolerant() -> str:
        try:
            await always_fails()
        except StepFailedError as exc:
            note = exc.error_type
        await step_a()
        if calls["tolerant"] == 0:
            calls["tolerant"] += 1
            raise RuntimeError("interrupt once")
        return note

    with pytest.raises(RuntimeError):
        await start_async(tolerant.options(settings=wf))
    assert await start_async(tolerant.options(settings=wf)) == "KeyError"
    assert calls["fails"] == 1 and calls["a"] == 1


async def test_non_retryable_errors_and_timeouts(wf: Settings) -> None:
    @step(retries=RetryPolicy(retries=5, base=0, retry_on=(ConnectionError,)))
    async def picky() -> None:
        calls["picky"] += 1
        raise TypeError("not retried")

    @step(timeout=0.1)
    async def slow() -> None:
        calls["slow"] += 1
        await anyio.sleep(30)

    @workflow
    async def both(which: str) -> None:
        await (picky() if which == "picky" else slow())

    with pytest.raises(StepFailedError, match="TypeError: not retried"):
        await start_async(both.options(settings=wf), "picky")
    assert calls["picky"] == 1
    with anyio.fail_after(10):
        with pytest.raises(StepFailedError) as info:
            await start_async(both.options(settings=wf), "slow")
    assert info.value.error_type == "TimeoutError" and "timed out after 0.1 s" in info.value.error_message


async def test_unencodable_argument_fails_before_the_step_runs(wf: Settings) -> None:
    @step
    async def send(payload: dict[str, Any]) -> None:
        calls["send"] += 1

    @workflow
    async def sender() -> None:
        with socket.socket() as sock:
            await send({"ok": 1, "conn": sock})

    with pytest.raises(SerializationError) as info:
        await start_async(sender.options(settings=wf, run_id="ser"))
    assert send.id in str(info.value) and "argument 0['conn']" in str(info.value)
    assert calls["send"] == 0
    assert not [e for e in await events(wf, "ser") if isinstance(e, (StepCompleted, StepFailed))]


async def test_unencodable_result_is_a_recorded_final_failure(wf: Settings) -> None:
    @step(retries=3)
    async def leaky() -> object:
        calls["leaky"] += 1
        return (i for i in range(3))

    @workflow
    async def leaks() -> None:
        await leaky()

    # A step failure like any other (StepFailedError), the same live as on every replay.
    with pytest.raises(StepFailedError, match="result") as info:
        await start_async(leaks.options(settings=wf, run_id="leak"))
    assert isinstance(info.value.original, SerializationError)
    assert calls["leaky"] == 1  # not retried: it would return the same value
    failed = [e for e in await events(wf, "leak") if isinstance(e, StepFailed)]
    assert len(failed) == 1 and failed[0].final and failed[0].error.type == "werkfluss.SerializationError"
    assert await status(wf, "leak") == "failed"


async def test_gather_replays_identically_when_completion_order_differs(wf: Settings) -> None:
    @step
    async def square(i: int) -> int:
        calls["square"] += 1
        await anyio.sleep((20 - i) * 0.01)  # later calls finish first, 10 ms apart: appends cannot overtake
        return i * i

    @workflow
    async def fan_out(n: int) -> list[int]:
        results = await asyncio.gather(*(square(i) for i in range(n)))
        if calls["fan_out"] == 0:
            calls["fan_out"] += 1
            raise RuntimeError("interrupt once")
        return list(results)

    with pytest.raises(RuntimeError):
        await start_async(fan_out.options(settings=wf, run_id="fan"), 20)
    completed = [e for e in await events(wf, "fan") if isinstance(e, StepCompleted)]
    assert [e.seq for e in completed][:3] == [20, 19, 18]  # recorded in completion order
    assert await start_async(fan_out.options(settings=wf, run_id="fan"), 20) == [i * i for i in range(20)]
    assert calls["square"] == 20


async def test_concurrent_starts_of_one_run_share_one_execution(wf: Settings) -> None:
    @workflow
    async def once(x: int) -> int:
        await anyio.sleep(0.05)
        return await square_once(x)

    results = await asyncio.gather(*(start_async(once.options(settings=wf, run_id="same"), 4) for _ in range(10)))
    assert results == [16] * 10
    assert calls["square_once"] == 1


@step
async def square_once(x: int) -> int:
    calls["square_once"] += 1
    return x * x


async def test_run_id_conflicts_are_refused(wf: Settings) -> None:
    @workflow
    async def first() -> int:
        return 1

    @workflow
    async def second() -> int:
        return 2

    assert await start_async(first.options(settings=wf, run_id="taken")) == 1
    with pytest.raises(RunConflictError, match="belongs to workflow") as conflict:
        await start_async(second.options(settings=wf, run_id="taken"))
    assert conflict.value.run_id == "taken"

    @workflow
    async def interrupted(n: int) -> int:
        if calls["i"] == 0:
            calls["i"] += 1
            raise RuntimeError("stop")
        return n

    with pytest.raises(RuntimeError):
        await start_async(interrupted.options(settings=wf, run_id="args"), 1)
    with pytest.raises(RunConflictError, match="other arguments"):
        await start_async(interrupted.options(settings=wf, run_id="args"), 2)
    with pytest.raises(RunConflictError, match="other arguments"):  # completed runs too
        await start_async(first.options(settings=wf, run_id="taken"), 5)  # type: ignore[call-arg]


async def test_a_fenced_process_cannot_write(wf: Settings) -> None:
    """A process whose run was taken over (epoch bumped) is refused, and stops."""
    store = await open_store(wf)
    entered = anyio.Event()
    release = anyio.Event()

    @step
    async def long_step() -> str:
        calls["long"] += 1
        entered.set()
        await release.wait()
        return "late"

    @workflow
    async def fenced() -> str:
        return await long_step()

    async def take_over_and_finish() -> None:
        await entered.wait()
        state = await store.state("fence")
        got = await store.acquire(
            "fence", workflow=fenced.id, holder="otherhost/1/x", lease=10, started=b"",
            resumed=encode_event(RunResumed(0.0, "otherhost/1/x")),
            take_over=state.holder, args_digest=state.args,
        )  # fmt: skip
        assert got.kind == "resumed" and got.epoch == 2
        release.set()  # the stale process now tries to record its result
        await anyio.sleep(0.2)
        raw = msgspec.msgpack.encode("winner")
        await store.complete("fence", 2, raw)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take_over_and_finish)
        with anyio.fail_after(15):
            result = await start_async(fenced.options(settings=wf, run_id="fence"))
    assert result == "winner"  # the stale process adopted the new holder's result
    log = await events(wf, "fence")
    assert not [e for e in log if isinstance(e, StepCompleted)]  # its late write was refused
    assert calls["long"] == 1


async def test_store_refuses_stale_epochs_and_duplicate_completions(wf: Settings) -> None:
    store = await open_store(wf)
    got = await store.acquire(
        "f2", workflow="w", holder="h1/1/a", lease=10, started=b"s", resumed=b"r", take_over="", args_digest="d"
    )
    assert got.kind == "new"
    assert await store.append("f2", 1, "c1", b"first", 10) == (2, None)
    assert await store.append("f2", 1, "c1", b"second", 10) == (0, None)  # first writer wins
    busy = await store.acquire(
        "f2", workflow="w", holder="h2/1/b", lease=10, started=b"s", resumed=b"r", take_over="", args_digest="d"
    )
    assert busy.kind == "busy" and busy.holder == "h1/1/a"
    taken = await store.acquire(
        "f2", workflow="w", holder="h2/1/b", lease=10, started=b"s", resumed=b"r", take_over="h1/1/a", args_digest="d"
    )
    assert taken.kind == "resumed" and taken.epoch == 2
    from werkfluss._errors import _Suspend

    with pytest.raises(_Suspend):
        await store.append("f2", 1, "c2", b"zombie", 10)
    bodies = [body async for batch in store.read_log("f2") for _, body in batch]
    assert bodies == [b"s", b"first", b"r"]


async def test_a_holder_whose_log_was_rolled_back_under_it_is_refused_instead_of_leaving_a_hole(
    wf: Settings,
) -> None:
    # A server restarted from an older append-only file (or a lagging replica promoted)
    # forgets the newest events while the holder's epoch stays valid. Writing on would put
    # step 10 after step 2, with the lost steps missing: a replay would run them again
    # beneath a recorded later step. The holder says how far it has seen the log.
    store = await open_store(wf)
    got = await store.acquire(
        "rb", workflow="w", holder="h1/1/a", lease=10, started=b"s", resumed=b"r", take_over="", args_digest="d"
    )
    assert got.kind == "new"
    assert await store.append("rb", 1, "c1", b"one", 10, seen=1) == (2, None)
    assert await store.append("rb", 1, "c2", b"two", 10, seen=2) == (3, None)
    # The rollback: the newest event and the counter go back, as an older file has them.
    log = store.key("rb", "log")
    kept = cast("list[Any]", await store.client.xrange(log))[:2]
    await store.client.delete(log)
    for entry_id, fields in kept:
        await store.client.xadd(log, fields, id=entry_id)
    await store.client.hset(store.key("rb", "state"), "n", 2)
    await store.client.hdel(store.key("rb", "steps"), "c2")
    from werkfluss._errors import _Suspend

    for write in (
        store.append("rb", 1, "c3", b"three", 10, seen=3),
        store.pause("rb", 1, b"paused", b"", seen=3),
        store.complete("rb", 1, b"", seen=3),
    ):
        with pytest.raises(_Suspend, match="shorter than this process saw"):
            await write
    bodies = [body async for batch in store.read_log("rb") for _, body in batch]
    assert bodies == [b"s", b"one"]  # no hole: a resume replays from here and executes step 2 again
    assert await store.append("rb", 1, "c2", b"two again", 10, seen=2) == (3, None)  # a holder that saw no more


async def test_a_live_step_costs_one_round_trip_and_resume_reads_in_batches(wf: Settings, server: Any) -> None:
    raw = aioredis.Redis.from_url(server.url)
    n = 50

    @step
    async def tiny(i: int) -> int:
        return i

    @workflow
    async def chain(k: int) -> int:
        for i in range(k):
            await tiny(i)
        if calls["chain"] == 0:
            calls["chain"] += 1
            raise RuntimeError("interrupt once")
        return k

    with pytest.raises(RuntimeError):
        await start_async(chain.options(settings=wf, run_id="count"), 10)  # warm up: scripts loaded
    await raw.config_resetstat()
    with pytest.raises(RuntimeError):
        calls["chain"] = 0
        await start_async(chain.options(settings=wf, run_id="count2"), n)
    stats = await raw.info("commandstats")
    # commandstats also counts what scripts call inside; count what clients sent.
    # acquire + the run's watchdog wake-up (workers resume it if this process dies) + one per step + finish
    assert stats["cmdstat_evalsha"]["calls"] == n + 3
    # + zadd of the new run (and the wake-up's own, inside its script), zrem of the wake-up, config resetstat
    assert client_commands(stats) <= n + 7, stats
    await raw.config_resetstat()
    calls["chain"] = 1
    assert await start_async(chain.options(settings=wf, run_id="count2"), n) == n
    stats = await raw.info("commandstats")
    assert stats["cmdstat_xrange"]["calls"] == 1  # 50 steps: one batch
    # resetstat, acquire, the wake-up (and the zadd inside it), xrange, finish, the wake-up's zrem
    assert client_commands(stats) <= 7, stats
    await raw.aclose()


_SCRIPT_INTERNAL = {"hexists", "hset", "hget", "hmget", "hdel", "hincrby", "xadd", "time", "zrange", "lpush", "ltrim"}


def client_commands(stats: dict[str, Any]) -> int:
    return sum(v["calls"] for k, v in stats.items() if k.removeprefix("cmdstat_") not in _SCRIPT_INTERNAL | {"info"})


async def test_unreachable_redis_is_a_storage_error_naming_the_url() -> None:
    @workflow
    async def nowhere() -> None:
        return None

    settings = Settings(redis_url="redis://user:s3cret@127.0.0.1:1/0")
    with pytest.raises(StorageError) as info:
        await start_async(nowhere.options(settings=settings))
    assert "127.0.0.1:1" in str(info.value) and "s3cret" not in str(info.value)
    await close_stores()


async def test_resumed_event_names_the_new_holder(wf: Settings) -> None:
    @workflow
    async def twice() -> int:
        await step_a()
        if calls["twice"] == 0:
            calls["twice"] += 1
            raise RuntimeError("again")
        return 2

    with pytest.raises(RuntimeError):
        await start_async(twice.options(settings=wf, run_id="res"))
    assert await start_async(twice.options(settings=wf, run_id="res")) == 2
    resumed = [e for e in await events(wf, "res") if isinstance(e, RunResumed)]
    assert len(resumed) == 1 and resumed[0].holder.count("/") == 2


@pytest.fixture
def lossy_redis(tmp_path: Any, redis_server: Any) -> Iterator[str]:
    """A redis-server with an eviction policy and no persistence."""
    binary = shutil.which("redis-server")
    assert binary is not None
    sock = tmp_path / "lossy.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--dir", str(tmp_path), "--appendonly", "no",
         "--save", "", "--maxmemory-policy", "allkeys-lru", "--logfile", str(tmp_path / "log")],
    )  # fmt: skip
    wait_for(sock.exists, what="redis-server's socket")
    yield f"unix://{sock}"
    proc.terminate()
    proc.wait(10)


async def test_connecting_to_a_server_that_can_lose_data_warns(
    lossy_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    @workflow
    async def lossy() -> int:
        return 1

    try:
        with caplog.at_level("WARNING", logger="werkfluss"):
            assert await start_async(lossy.options(settings=Settings(redis_url=lossy_redis))) == 1
    finally:
        await close_stores()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "allkeys-lru" in messages and "no persistence" in messages
