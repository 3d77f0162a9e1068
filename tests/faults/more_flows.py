"""Workflows of the fault scenarios R-22 to R-36 (timers, code changes, payloads, cancels, soak).

Worker processes serve this module (``werkfluss worker tests.faults.more_flows``); it imports
`tests.faults.flows`, so they also get its ledger, barriers, store instrumentation and
workflows. Kept apart from flows.py so that scenarios written in parallel do not edit one file.

Process-wide switches, read once at import (like a machine's setup or a deployment):

- ``WF_FAULT_CLOCK_SKEW=<seconds>``: this process's wall clock (`time.time`) runs that far
  ahead (or behind, if negative) of the machine's: a worker on a skewed host (R-23). The
  monotonic clocks (event loop, timeouts) are untouched, as a skewed host's would be.
  `true_time` is the machine's clock, for figures. With ``WF_FAULT_CLOCK_STEP_FILE=<path>``
  the clock steps by the skew only once that file exists (as NTP steps a clock), and the
  process writes a ``clock-stepped`` ledger row when it notices.
- ``WF_FAULT_COUNT_MOVES=1``: a ``moved <count>`` ledger row for each call of the store's
  `move_due` that moved timers to the queue (R-24: the firing script's batches).
- ``WF_FAULT_PROBE=<seconds>``: ``$WF_FAULT_DIR/probes/<pid>`` rewritten that often with
  the number of runs this process holds in memory and its thread count (R-36).
- ``WF_FAULT_VERSION``: the deployment of `evolving` (R-26), as for flows.deployed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec

import werkfluss._holder
from werkfluss import RetryPolicy, Settings, StepFailedError, hook, sleep, sleep_until, step, step_key, workflow
from werkfluss._store._open import _stores, open_store

from .flows import VERSION, conclude, fault_dir, reserve, row, ship, work

true_time = time.time  # the machine's clock, whatever this process's clock says

SKEW = float(os.environ.get("WF_FAULT_CLOCK_SKEW", "0"))
_step_file = os.environ.get("WF_FAULT_CLOCK_STEP_FILE")  # the skew starts once this file exists
_stepped = not _step_file


def _skewed() -> float:
    return true_time() + SKEW if _stepped else true_time()


def _watch_step(path: str) -> None:
    global _stepped
    while not os.path.exists(path):
        true_sleep(0.02)  # a daemon thread polling for the test's signal
    _stepped = True
    row("clock-stepped", str(os.getpid()), str(SKEW))


true_sleep = time.sleep
if SKEW:
    # Module attribute, so that every ``time.time()`` in the process (werkfluss's included) sees it.
    time.time = _skewed
    if _step_file:
        threading.Thread(target=_watch_step, args=(_step_file,), daemon=True).start()


# -- a sleep whose deadline is checked against the machine's clock -------------------------------------------


@step(name="faults:stamp")
async def stamp() -> float:
    """The machine's time just before the sleep: a lower bound of when the sleep was reached."""
    await work(step_key())
    now = true_time()
    row("stamp", step_key(), f"{now:.6f}")
    return now


@step(name="faults:woke")
async def woke(stamped: float, seconds: float) -> float:
    key = step_key()
    await work(key)
    fired = true_time()
    row("fire", key, f"{fired:.6f}", f"{stamped + seconds:.6f}", str(SKEW))
    return fired


@workflow(name="faults:skewed-nap")
async def skewed_nap(n: int, seconds: float) -> int:
    stamped = await stamp()
    await sleep(seconds)
    await woke(stamped, seconds)
    return n


# -- many runs sleeping until one instant ----------------------------------------------------------------------


@step(name="faults:after-herd")
async def after_herd(n: int) -> int:
    await work(step_key())
    return n


@workflow(name="faults:herd")
async def herd(n: int, at: float) -> int:
    # One moment for every run (not a length from each run's own now): the timers share one score.
    await sleep_until(datetime.fromtimestamp(at, UTC))
    return await after_herd(n)


if os.environ.get("WF_FAULT_COUNT_MOVES") == "1":
    from werkfluss._store import RedisStore

    _move_due = RedisStore.move_due

    async def _counted_move_due(self: RedisStore, limit: int = 100, *, queue: str = "q") -> tuple[int, float | None]:
        moved, nxt = await _move_due(self, limit, queue=queue)
        if moved:
            row("moved", str(moved), str(limit))
        return moved, nxt

    RedisStore.move_due = _counted_move_due  # type: ignore[method-assign,assignment]


# -- compatible and incompatible deployments of one workflow -------------------------------------------------


if VERSION == "defaulted":  # a field with a default added to the step's result

    class Parcel(msgspec.Struct):
        """What `pack` returns (this deployment: with a weight)."""

        n: int
        label: str
        weight: int = 0

else:

    class Parcel(msgspec.Struct):  # type: ignore[no-redef]
        """What `pack` returns."""

        n: int
        label: str


@step(name="faults:E-count")
async def count(n: int) -> int:
    await work(step_key())
    return n + 1


@step(name="faults:E-pack")
async def pack(n: int) -> Parcel:
    await work(step_key())
    return Parcel(n * 2, f"parcel-{n}")


@step(name="faults:E-pack-renamed")
async def pack_renamed(n: int) -> Parcel:
    await work(step_key())
    return Parcel(n * 2, f"parcel-{n}")


@step(name="faults:E-extra")
async def extra(n: int) -> int:
    await work(step_key())
    return 0


@step(name="faults:E-send")
async def send(total: int, label: str, payload: Any) -> str:
    await work(step_key())
    return f"{label}:{total}/{payload}"


@step(name="faults:E-send-renamed")
async def send_renamed(total: int, label: str, payload: Any) -> str:
    await work(step_key())
    return f"{label}:{total}/{payload}"


@step(name="faults:E-notify")
async def notify(sent: str) -> str:
    await work(step_key())
    return f"{sent}+notified"


def evolve_token(n: int) -> str:
    return f"evolve:{n}"


@workflow(name="faults:evolving")
async def evolving(n: int) -> str:
    if VERSION == "swapped":
        parcel = await pack(n)
        counted = await count(n)
    elif VERSION == "renamed":
        counted = await count(n)
        parcel = await pack_renamed(n)
    elif VERSION == "removed":
        counted, parcel = await count(n), Parcel(0, "none")
    elif VERSION == "inserted":
        counted = await count(n)
        await extra(n)
        parcel = await pack(n)
    else:
        counted = await count(n)
        parcel = await pack(n)
    weight = getattr(parcel, "weight", 0)  # the defaulted field, where this deployment has it
    payload = await hook(token=evolve_token(n))
    if VERSION == "dropped-last":  # the last step removed: the tail of a finished run no longer matches
        return f"{parcel.label}:{counted + parcel.n + weight}/{payload}"
    if VERSION == "last-renamed":
        return await send_renamed(counted + parcel.n + weight, parcel.label, payload)
    sent = await send(counted + parcel.n + weight, parcel.label, payload)
    if VERSION == "appended":  # a step appended at the end
        return await notify(sent)
    return sent


def expected_evolving(n: int, payload: Any, version: str) -> str:
    sent = f"parcel-{n}:{n + 1 + n * 2}/{payload}"
    return f"{sent}+notified" if version == "appended" else sent


# -- results and exceptions that cannot be stored ---------------------------------------------------------------

QUICK_RETRIES = RetryPolicy(retries=2, base=0.01, max_delay=0.05)


@step(name="faults:gives-generator", retries=QUICK_RETRIES)
async def gives_generator(n: int):  # type: ignore[no-untyped-def]  # unannotated: any result is tried
    row("exec", step_key())
    return (i for i in range(n))


@step(name="faults:gives-object", retries=QUICK_RETRIES)
async def gives_object(n: int):  # type: ignore[no-untyped-def]
    row("exec", step_key())
    return {"n": n, "guard": threading.Lock()}


@step(name="faults:raises-needy", retries=QUICK_RETRIES)
async def raises_needy(n: int) -> int:
    row("exec", step_key())
    from . import exotic  # only here: a process that merely replays this step never imports it

    raise exotic.NeedyError(n, "the gateway refused")


BAD_RESULTS = {"generator": gives_generator, "object": gives_object, "exception": raises_needy}


@workflow(name="faults:bad-result")
async def bad_result(kind: str) -> Any:
    return await BAD_RESULTS[kind](3)


def keep_token(n: int) -> str:
    return f"keep:{n}"


@workflow(name="faults:keeps-failures")
async def keeps_failures(n: int) -> list[list[Any]]:
    """Each bad step's failure as this process sees it (live, or replayed from the log), after a hook."""
    seen: list[list[Any]] = []
    for kind, bad in BAD_RESULTS.items():
        try:
            await bad(n)
        except StepFailedError as exc:
            original = None if exc.original is None else type(exc.original).__name__
            seen.append([kind, exc.error_type, exc.error_message[:120], exc.attempts, original])
    await hook(token=keep_token(n))
    return seen


# -- payloads of every size -------------------------------------------------------------------------------------


@step(name="faults:echo")
async def echo(blob: bytes) -> bytes:
    await work(step_key())
    return blob


@step(name="faults:grow")
async def grow(size: int) -> bytes:
    await work(step_key())
    return b"g" * size


@step(name="faults:chunk")
async def chunk(i: int, size: int) -> bytes:
    await work(step_key())
    return bytes([i % 256]) * size


@workflow(name="faults:payload")
async def payload(blob: bytes) -> str:
    """A step given `blob` as its argument returns it as its result."""
    back = await echo(blob)
    return hashlib.sha256(back).hexdigest()


@workflow(name="faults:payload-made")
async def payload_made(size: int, where: str) -> str:
    """A value of `size` bytes made in the body: passed to a step (``argument``) or returned by one."""
    if where == "argument":
        back = await echo(b"a" * size)
    else:
        back = await grow(size)
    return hashlib.sha256(back).hexdigest()


@workflow(name="faults:fan-out")
async def fan_out(count: int, size: int) -> str:
    parts = await asyncio.gather(*(chunk(i, size) for i in range(count)))
    return hashlib.sha256(b"".join(parts)).hexdigest()


def expected_fan_out(count: int, size: int) -> str:
    return hashlib.sha256(b"".join(bytes([i % 256]) * size for i in range(count))).hexdigest()


# -- a long step that talks to the server through the worker's own connection pool ---------------------------


@step(name="faults:canary")
async def canary(n: int, seconds: float, pace: float) -> int:
    """Pairs of SET and GET of a unique key through the worker's store, every `pace` s for
    `seconds` or until cancelled; a GET answering another request's value is cross-talk
    (CVE-2023-28858/28859). Ends with a ``canary <key> <pid> <time> <how> <pairs> <wrong>``
    ledger row; `how` is ``finished``, ``cancelled`` or ``cancelled-mid-call`` (inside a SET
    or GET: the case that left replies on a pooled connection)."""
    key = step_key()
    await work(key)
    store = await open_store(Settings.from_env())
    # The worker's own store (one per event loop and settings): its pool carries the run's writes too.
    assert list(_stores[asyncio.get_running_loop()].values()) == [store]
    client, prefix = store.client, store.prefix
    pairs, wrong, how, in_call = 0, 0, "finished", False
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            name, value = f"{prefix}canary:{key}:{pairs}", f"{key}/{pairs}/{os.getpid()}"
            in_call = True
            await client.set(name, value, ex=120)
            got = await client.get(name)
            in_call = False
            if (got.decode() if isinstance(got, bytes) else got) != value:
                wrong += 1
                row("crosstalk", key, value, str(got).replace(" ", "_"))
            pairs += 1
            await anyio.sleep(pace)
    except anyio.get_cancelled_exc_class():
        how = "cancelled-mid-call" if in_call else "cancelled"
        raise
    finally:
        row("canary", key, how, str(pairs), str(wrong))
    return n


@workflow(name="faults:cancellable")
async def cancellable(n: int, seconds: float, pace: float) -> str:
    await canary(n, seconds, pace)
    return await ship(f"after-{n}")  # must never start once the run is cancelled


# -- a steady mix of steps, sleeps and hooks --------------------------------------------------------------------


def soak_token(n: int) -> str:
    return f"soak:{n}"


@workflow(name="faults:mixed")
async def mixed(n: int, nap: float) -> str:
    prepared = await reserve(n)
    await sleep(nap)
    got = await hook(token=soak_token(n))
    return await conclude(prepared, got)


def expected_mixed(n: int, got: Any) -> str:
    return f"{n * 10}:{got}"


def _probe(every: float) -> None:
    where = fault_dir()
    assert where is not None
    (where / "probes").mkdir(exist_ok=True)
    probe, tmp = where / "probes" / str(os.getpid()), where / "probes" / f".{os.getpid()}"
    while True:
        tmp.write_text(f"{len(werkfluss._holder._live)} {threading.active_count()}\n")
        os.replace(tmp, probe)
        time.sleep(every)  # a sampling period in a daemon thread, not a synchronisation


if os.environ.get("WF_FAULT_PROBE") and fault_dir() is not None:
    threading.Thread(target=_probe, args=(float(os.environ["WF_FAULT_PROBE"]),), daemon=True).start()
