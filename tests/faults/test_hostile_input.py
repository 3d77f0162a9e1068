"""R-30: hostile input written straight into run logs, the queue stream and hook mailboxes.

Hypothesis generates the garbage (invalid msgpack, wrong types, unknown tags, pickle
bytes whose unpickling would create a sentinel file, msgpack ext types, deep nesting,
length lies, large fields, missing fields, run IDs that do not exist or belong to
another prefix). One real worker process serves while it arrives. It must never
crash or execute anything, must dead-letter every bad entry with its reason and
source, and healthy runs must go on completing.
"""

from __future__ import annotations

import os
import pickle
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from werkfluss import enqueue_async, invoke_hook_async
from werkfluss._events import RunStarted, encode_event
from werkfluss._store._open import close_stores, open_store

from ..workers import Workers, server_env
from .fuzz_flows import healthy, inbox

if TYPE_CHECKING:
    from pathlib import Path

    from werkfluss import Settings

    from ..conftest import Server

ENTRIES = int(os.environ.get("WF_FUZZ_ENTRIES", "10000"))
BATCH = 250
INBOXES = 4


class _Sentinel:
    """Unpickling this creates a file: proof that someone ran code from the data."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def garbage_bytes(sentinel: str) -> st.SearchStrategy[bytes]:
    """Bytes that are not a valid werkfluss event, nor a valid int payload."""
    deep = st.integers(100, 20_000).map(lambda n: b"\x91" * n + b"\xc0")  # and 200k deep: see EXTREMES
    length_lies = st.sampled_from([
        b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xfe" + b"abc", b"\xc6\x7f\xff\xff\xff\x00",
        b"\xdf\xff\xff\xff\xff\x01", b"\x96\x01",
    ])  # fmt: skip
    ext = st.tuples(st.integers(-128, 127), st.binary(max_size=64)).map(
        lambda t: msgspec.msgpack.encode(msgspec.msgpack.Ext(t[0], t[1]))
    )
    wrong_types = st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=30) | st.binary(max_size=30),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
        max_leaves=20,
    ).map(msgspec.msgpack.encode)
    unknown_tags = st.tuples(st.text(max_size=20), st.floats(allow_nan=False), st.integers(-(2**63), 2**63 - 1)).map(
        lambda t: msgspec.msgpack.encode([f"x-{t[0]}", t[1], t[2]])
    )
    pickles = st.just(pickle.dumps(_Sentinel(sentinel), protocol=pickle.HIGHEST_PROTOCOL))
    return st.one_of(
        st.binary(min_size=1, max_size=200), deep, length_lies, ext, wrong_types, unknown_tags, pickles
    ).filter(lambda raw: not _is_int(raw))  # fmt: skip


def _is_int(raw: bytes) -> bool:
    try:
        msgspec.msgpack.decode(raw, type=int)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return False
    return True


def hostile_entry(sentinel: str) -> st.SearchStrategy[tuple[str, dict[bytes, bytes]]]:
    """(target, stream fields): a queue message, a run's log entry, or a hook payload."""
    junk = garbage_bytes(sentinel)
    run_ids = st.one_of(
        st.binary(max_size=40),  # not a run ID at all
        st.from_regex(r"\Aghost-[a-z0-9]{1,12}\Z").map(str.encode),  # no such run
        st.just(b"other-app:{x}:state"),  # braces: never a run ID
    )
    queue = st.one_of(
        st.dictionaries(st.binary(min_size=1, max_size=10), st.binary(max_size=50), min_size=1, max_size=4),
        run_ids.map(lambda r: {b"r": r}),
        st.tuples(run_ids, junk).map(lambda t: {b"r": t[0], b"x": t[1][:100]}),
    ).filter(lambda fields: b"r" not in fields or not fields[b"r"].startswith((b"fz-", b"inbox-")))
    log = st.one_of(junk.map(lambda b: {b"e": b}), st.just({b"nothing": b"here"}))
    hook_payload = st.one_of(junk.map(lambda b: {b"p": b}), st.just({b"q": b"no payload field"}))
    return st.one_of(
        queue.map(lambda f: ("queue", f)), log.map(lambda f: ("log", f)), hook_payload.map(lambda f: ("hook", f))
    )


# Rare and heavy, so written once per target rather than drawn thousands of times:
# 200,000-deep nesting and 4 MiB fields.
EXTREMES = [b"\x91" * 200_000 + b"\xc0", b"\xc6" + (4 << 20).to_bytes(4, "big") + b"\0" * (4 << 20)]


def generate(sentinel: str, total: int) -> list[tuple[str, dict[bytes, bytes]]]:
    entries: list[tuple[str, dict[bytes, bytes]]] = [
        (target, {field: raw}) for raw in EXTREMES for target, field in (("log", b"e"), ("hook", b"p"))
    ]
    entries.append(("queue", {b"r": b"ghost", b"x": EXTREMES[1]}))

    @given(st.lists(hostile_entry(sentinel), min_size=BATCH, max_size=BATCH))
    @settings(max_examples=-(-total // BATCH), deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def collect(batch: list[tuple[str, dict[bytes, bytes]]]) -> None:
        entries.extend(batch)

    collect()
    return entries[:total] if len(entries) >= total else entries


@pytest.mark.parametrize("server", ["valkey"], indirect=True)
# Only a hang's bound: the deadlines inside (30 + 90 + 60 + 30 s) report what is stuck. Not pytest's default 120 s:
# generating the 10,000 entries with Hypothesis and writing them one by one is CPU-bound work in this process, and
# the test took 37 s on our 2-core machine beside two CPU hogs, 189 s at a load average of 10 (hogs and other suites).
@pytest.mark.timeout(600)
async def test_hostile_entries_are_dead_lettered_and_execute_nothing(
    server: Server, prefix: str, settings: Settings, tmp_path: Path
) -> None:
    sentinel = str(tmp_path / "SENTINEL")
    entries = generate(sentinel, ENTRIES)
    assert len(entries) >= ENTRIES
    store = await open_store(settings)
    workers = Workers(server_env(server, prefix), tmp_path, "tests.faults.fuzz_flows", concurrency=16)
    worker = workers.start()
    try:
        # Runs waiting on hooks, each with one good payload taken before the garbage arrives.
        tokens = [f"inbox-{i}" for i in range(INBOXES)]
        for token in tokens:
            await enqueue_async(inbox.options(run_id=token, settings=settings), token)
            await invoke_hook_async(token, 5, settings=settings)
        await until(lambda: all_status(settings, tokens, "paused"), 30, "the inboxes to pause")

        healthy_ids, planted = [], []
        expected_dead = 0
        started = time.monotonic()
        for i, (target, fields) in enumerate(entries):
            if target == "queue":
                await store.client.xadd(store.queue_key("queue"), fields)  # type: ignore[arg-type]
            elif target == "log":
                run_id = f"fz-bad-{uuid.uuid4().hex[:12]}"
                await plant_run(settings, run_id, fields)
                planted.append(run_id)
                await store.client.xadd(store.queue_key("queue"), {"r": run_id})
            else:
                token = tokens[i % INBOXES]
                await store.client.xadd(store.hook_key(token, "box"), fields)  # type: ignore[arg-type]
                await store.wake(token)
            expected_dead += 1
            if i % 200 == 0:  # healthy work keeps arriving alongside
                healthy_ids.append(await enqueue_async(healthy.options(run_id=f"fz-ok-{i}", settings=settings), i))
        injected = time.monotonic() - started

        async def dead_count() -> int:
            return int(await store.client.xlen(store.queue_key("dead")))

        deadline = time.monotonic() + 90
        while (dead := await dead_count()) < expected_dead and worker.poll() is None:
            if time.monotonic() > deadline:
                kinds = Counter(t for t, _ in entries)
                dead_kinds = Counter("hook" if "source" in f else "queue" for _, f in await store.dead_letters(10**6))
                pytest.fail(f"{dead} dead letters of {expected_dead}: injected {kinds}, dead {dead_kinds}; worker log: "
                            f"{workers.log(worker)[-3000:]}")  # fmt: skip
            await anyio.sleep(0.2)
        assert worker.poll() is None, workers.log(worker)  # never crashed
        if dead != expected_dead:
            letters = await store.dead_letters(10**6)
            by_kind = Counter(
                f.get("source", "queue").split(" ")[0] + ":" + f.get("reason", "")[:40] for _, f in letters
            )
            pytest.fail(f"{dead} != {expected_dead}: {Counter(t for t, _ in entries)} {by_kind.most_common(12)}")
        await until(lambda: all_status(settings, healthy_ids, "completed"), 60, "the healthy runs")
        for run_id in healthy_ids:
            n = int(run_id.rsplit("-", 1)[1])
            state = await store.state(run_id)
            assert msgspec.msgpack.decode(state.result or b"") == n * n + (n + 1) * (n + 1)
        for token in tokens:  # the inboxes kept their good payload and still take new ones
            await invoke_hook_async(token, 0, settings=settings)
        await until(lambda: all_status(settings, tokens, "completed"), 30, "the inboxes to finish")
        assert {msgspec.msgpack.decode((await store.state(t)).result or b"") for t in tokens} == {5}

        # A run whose log does not decode is failed with the reason, not left looking in progress.
        assert {await store.status(run_id) for run_id in planted} == {"failed"}
        letters = await store.dead_letters(expected_dead + 10)
        assert all(fields.get("reason") for _, fields in letters)
        sources = {"hook" if "source" in f else "queue" for _, f in letters}
        assert sources == {"hook", "queue"}
        assert not (tmp_path / "SENTINEL").exists()  # nothing was ever unpickled
        assert "Traceback" not in workers.log(worker)  # no unexpected exception, only handled ones
        drained = time.monotonic() - started
        print(f"\n[fault] R-30: {len(entries)} hostile entries, dead letters {dead}, worker crashes 0, "
              f"sentinel 0, healthy runs {len(healthy_ids)} completed; injected in {injected:.1f} s, "
              f"all handled in {drained:.1f} s")  # fmt: skip
    finally:
        workers.stop_all()
        await close_stores()


async def plant_run(settings: Settings, run_id: str, fields: dict[bytes, bytes]) -> None:
    """A pending run of fz.healthy whose log holds a valid start, then the hostile entry."""
    store = await open_store(settings)
    started = encode_event(RunStarted(time.time(), "fz.healthy", msgspec.Raw(msgspec.msgpack.encode([[1], {}]))))
    now = int(time.time() * 1000)
    await store.client.hset(
        store.key(run_id, "state"),
        mapping={"status": "pending", "workflow": "fz.healthy", "epoch": 0, "n": 2, "created": now, "updated": now},
    )
    await store.client.xadd(store.key(run_id, "log"), {"e": started}, id="0-1")
    await store.client.xadd(store.key(run_id, "log"), fields, id="0-2")  # type: ignore[arg-type]


async def all_status(settings: Settings, run_ids: list[str], status: str) -> bool:
    store = await open_store(settings)
    return all([await store.status(r) == status for r in run_ids])


async def until(check: Any, timeout: float, what: str) -> None:
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.05)
