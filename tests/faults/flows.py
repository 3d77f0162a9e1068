"""Workflows the fault scenarios run in real worker processes (``werkfluss worker tests.faults.flows``).

Everything a step does that the test must see goes to an append-only **ledger** file,
``$WF_FAULT_DIR/ledger``, one line per row, each written with a single ``O_APPEND``
write so lines from concurrent processes never interleave and a SIGKILL never leaves
half a line::

    <kind> <key> <pid> <unix time> [extra ...]

Kinds: ``exec`` (a step body started; key = `step_key()`), ``effect`` (the step applied
its external effect, extra ``applied`` or ``dup``: the *sink* deduplicates on the step
key, like a payment API given an idempotency key), ``caught`` (user code in a workflow
body saw an exception), ``poison`` (a step about to ``os._exit``), and, in worker
processes started with ``WF_FAULT_INSTRUMENT=1``, ``call``/``done`` rows around the
store's write scripts (see `_instrument`).

**Barriers** stop a process at a named point so the test can SIGKILL it there, with no
sleep involved. The test *arms* ``<point>@<key>`` by creating
``$WF_FAULT_DIR/barriers/arm/<point>@<key>``. The first process reaching that point
renames the arm file (so exactly one execution stops, and a re-execution after the kill
passes), writes its PID to ``reached/<point>@<key>``, and waits until the test creates
``release/<point>@<key>`` (or is killed). `barrier` waits asynchronously (the process's
event loop keeps renewing leases); `stall` blocks the whole event loop, as a CPU-bound
step or a long GC pause would, so the process's lease lapses.

Without ``WF_FAULT_DIR`` (the test process computing fault-free reference runs) none of
this happens: the steps are plain.
"""

from __future__ import annotations

import functools
import inspect
import os
import random
import time
from pathlib import Path
from typing import Any

import anyio

from werkfluss import hook, race, sleep, step, step_key, workflow
from werkfluss._context import current_run
from werkfluss._engine._executor import RunExecutor

BARRIER_LIMIT = 300.0  # seconds a barrier holds at most: a forgotten process must not hang forever
BARRIER_POLL = 0.005


def fault_dir() -> Path | None:
    value = os.environ.get("WF_FAULT_DIR")
    return Path(value) if value else None


def row(kind: str, key: str, *extra: str) -> None:
    """Append one ledger row (nothing without ``WF_FAULT_DIR``)."""
    where = fault_dir()
    if where is None:
        return
    line = " ".join([kind, key, str(os.getpid()), f"{time.time():.6f}", *extra]) + "\n"
    fd = os.open(where / "ledger", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def barrier_name(point: str, key: str) -> str:
    return f"{point}@{key}".replace("/", "%2F")


def _arrive(point: str, key: str) -> Path | None:
    """Take the arm of ``point@key`` if it is armed; returns the release file to wait for."""
    where = fault_dir()
    if where is None:
        return None
    name = barrier_name(point, key)
    base = where / "barriers"
    try:
        os.rename(base / "arm" / name, base / "taken" / name)
    except FileNotFoundError:
        return None
    tmp = base / "reached" / f".{name}.{os.getpid()}"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, base / "reached" / name)
    return base / "release" / name


async def barrier(point: str, key: str) -> None:
    """Stop here while the test holds ``point@key`` (asynchronously: leases keep being renewed)."""
    release = _arrive(point, key)
    if release is None:
        return
    deadline = time.monotonic() + BARRIER_LIMIT
    while not release.exists() and time.monotonic() < deadline:
        await anyio.sleep(BARRIER_POLL)


def stall(point: str, key: str) -> None:
    """Stop here while the test holds ``point@key``, blocking the event loop (no lease renewals)."""
    release = _arrive(point, key)
    if release is None:
        return
    deadline = time.monotonic() + BARRIER_LIMIT
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(BARRIER_POLL)


def apply_effect(key: str) -> bool:
    """The external effect of a step, made exactly-once by a sink that deduplicates on `key`."""
    where = fault_dir()
    if where is None:
        return True
    try:
        fd = os.open(where / "effects" / key.replace("/", "%2F"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        row("effect", key, "dup")
        return False
    os.close(fd)
    row("effect", key, "applied")
    return True


def run_id() -> str:
    """The run whose workflow body is executing (for barrier keys and hook tokens)."""
    run = current_run()
    assert run is not None, "only in a workflow body"
    return run.run_id


async def work(key: str) -> None:
    """Record the execution and take the configured step time (``WF_FAULT_STEP_DELAY``)."""
    row("exec", key)
    delay = float(os.environ.get("WF_FAULT_STEP_DELAY", "0"))
    if delay:
        await anyio.sleep(delay)


# -- three steps, the middle one with an external effect ---------------------


@step(name="faults:reserve")
async def reserve(n: int) -> int:
    await work(step_key())
    return n * 10


@step(name="faults:charge")
async def charge(total: int) -> str:
    key = step_key()
    await work(key)
    await barrier("before-effect", key)
    apply_effect(key)
    await barrier("after-effect", key)
    return f"receipt-{total}"


@step(name="faults:ship")
async def ship(receipt: str) -> str:
    await work(step_key())
    return receipt.upper()


@workflow(name="faults:order")
async def order(n: int) -> str:
    total = await reserve(n)
    await barrier("between", run_id())  # after step 1's completion is recorded, before step 2 starts
    receipt = await charge(total)
    return await ship(receipt)


def expected_order(n: int) -> str:
    return f"RECEIPT-{n * 10}"


# -- a step that can stall its whole process; user code that would catch anything ---------------------------


@step(name="faults:crunch")
async def crunch(n: int) -> int:
    key = step_key()
    await work(key)
    stall("stall", key)
    return n * n


@workflow(name="faults:contested")
async def contested(n: int) -> int:
    try:
        total = await reserve(n)
        return await crunch(total) + 1
    except Exception as exc:  # werkfluss's own unwinding must never land here
        row("caught", run_id(), type(exc).__name__)
        raise


# -- a step, then a hook -------------------------------------------------------------------------


@step(name="faults:prepare")
async def prepare(n: int) -> int:
    key = step_key()
    await work(key)
    await barrier("prepare", key)
    return n + 1


@step(name="faults:conclude")
async def conclude(prepared: int, payload: Any) -> str:
    await work(step_key())
    return f"{prepared}:{payload}"


def approval_token(n: int) -> str:
    return f"approve:{n}"


@workflow(name="faults:approval")
async def approval(n: int) -> str:
    prepared = await prepare(n)
    payload = await hook(token=approval_token(n))
    return await conclude(prepared, payload)


# -- R-21, R-03 (pause): a step, a durable sleep, a step -------------------------------------------------------------


@workflow(name="faults:nap")
async def nap(n: int, seconds: float) -> str:
    total = await reserve(n)
    await sleep(seconds)
    return await ship(f"woke-{total}")


def expected_nap(n: int) -> str:
    return f"WOKE-{n * 10}"


# -- the same workflow as deployed in several versions ------------------------------------------------------

VERSION = os.environ.get("WF_FAULT_VERSION", "v1")  # read once, at import: a deployment


@step(name="faults:A")
async def step_a(n: int) -> int:
    await work(step_key())
    return n + 1


@step(name="faults:B")
async def step_b(n: int) -> int:
    await work(step_key())
    return n * 2


@step(name="faults:B-renamed")
async def step_b_renamed(n: int) -> int:
    await work(step_key())
    return n * 2


@step(name="faults:X")
async def step_x(n: int) -> int:
    await work(step_key())
    return 0


@step(name="faults:C")
async def step_c(total: int, payload: Any) -> str:
    await work(step_key())
    return f"{total}/{payload}"


def deploy_token(n: int) -> str:
    return f"deploy:{n}"


@workflow(name="faults:deployed")
async def deployed(n: int) -> str:
    if VERSION == "swapped":  # (a) A and B swapped
        b = await step_b(n)
        a = await step_a(n)
    elif VERSION == "renamed":  # (b) B renamed
        a = await step_a(n)
        b = await step_b_renamed(n)
    elif VERSION == "removed":  # (c) B removed
        a, b = await step_a(n), 0
    elif VERSION == "inserted":  # (d) a step inserted before B
        a = await step_a(n)
        await step_x(n)
        b = await step_b(n)
    else:
        a = await step_a(n)
        b = await step_b(n)
    payload = await hook(token=deploy_token(n))
    return await step_c(a + b, payload)


# -- a step that kills its worker on every attempt ------------------------------------------------------------


@step(name="faults:poison")
async def poison(n: int) -> int:
    key = step_key()
    await work(key)
    if fault_dir() is not None and not os.environ.get("WF_FAULT_POISON_FIXED"):  # never in the test process
        row("poison", key)
        os._exit(1)
    return -n


@workflow(name="faults:poisoned")
async def poisoned(n: int) -> int:
    return await poison(await reserve(n))


@workflow(name="faults:healthy")
async def healthy(n: int) -> str:
    return await ship(f"ok-{await reserve(n)}")


def expected_healthy(n: int) -> str:
    return f"OK-{n * 10}"


# -- arguments that cannot be stored -------------------------------------------------------------------------


@step(name="faults:store-this")
async def store_this(value: Any) -> str:
    apply_effect(step_key())  # the side effect that must never happen
    return "stored"


@workflow(name="faults:unstorable")
async def unstorable(kind: str) -> str:
    # The bad values are made inside the body: a workflow's own arguments must be storable.
    import socket

    value: Any
    if kind == "socket":
        value = socket.socket()
    elif kind == "lambda":
        value = {"callback": lambda: None}
    elif kind == "file":
        value = [1, open(os.devnull)]  # noqa: ASYNC230 - an open file is the point
    else:
        cycle: list[Any] = []
        cycle.append(cycle)
        value = {"nested": {"cycle": cycle}}
    try:
        return await store_this(value)
    finally:
        for item in (value, *(value if isinstance(value, list) else [])):
            close = getattr(item, "close", None)
            if close is not None:
                close()


# -- store instrumentation (worker processes only) ------------------------------------------------------------------


def _outcome(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "_Suspend":
        return "fenced"
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "cancelled"
    return f"error:{name}"


def _instrument() -> None:
    """Wrap the store's run-writing methods: a ``call`` row before each, a ``done`` row after
    (``ok <reply>``, ``fenced``, ``cancelled`` or ``error:<type>``), then the barrier
    ``after-<method>@<run>[#<dedup>]``. The real method runs unchanged in between: the
    test sees every write a worker attempted and what the server answered."""
    from werkfluss._store import RedisStore

    # A run's end (complete, fail, block, mark_cancelled) is one script call in `_finish`: "finish" here.
    for name, method in (("append", "append"), ("finish", "_finish"), ("pause", "pause")):
        original = getattr(RedisStore, method)
        signature = inspect.signature(original)

        def wrap(original: Any = original, signature: inspect.Signature = signature, name: str = name) -> Any:
            @functools.wraps(original)
            async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                bound = signature.bind(self, *args, **kwargs).arguments
                run, dedup = str(bound.get("run_id", "?")), str(bound.get("dedup", ""))
                key = f"{run}#{dedup}" if dedup else run
                target = f"{name}@{key}"
                row("call", target, str(bound.get("epoch", "")))
                try:
                    result = await original(self, *args, **kwargs)
                except BaseException as exc:
                    row("done", target, str(bound.get("epoch", "")), _outcome(exc))
                    raise
                reply = result[0] if isinstance(result, tuple) else result
                row("done", target, str(bound.get("epoch", "")), "ok", str(reply).replace(" ", "_") or "-")
                await barrier(f"after-{name}", key)
                return result

            return wrapper

        setattr(RedisStore, method, wrap())


if os.environ.get("WF_FAULT_INSTRUMENT") == "1":
    _instrument()


# -- ten short steps of random latency -------------------------------------------------------------------------


@step(name="faults:hop")
async def hop(total: int, i: int) -> int:
    await work(step_key())
    # Random latency (RELIABILITY.md: 1-200 ms), so that kills land anywhere in a step.
    high = float(os.environ.get("WF_FAULT_HOP_MAX", "0.2"))
    await anyio.sleep(random.uniform(0.001, high))
    return total + i


@workflow(name="faults:hops")
async def hops(n: int, steps: int) -> int:
    total = n
    for i in range(steps):
        total = await hop(total, i)
    return total


def expected_hops(n: int, steps: int) -> int:
    return n + steps * (steps - 1) // 2


# -- one long step ---------------------------------------------------------------------------------------


@step(name="faults:long")
async def long_step(n: int, seconds: float) -> int:
    key = step_key()
    await work(key)
    await barrier("long", key)  # an armed barrier makes the first execution last until released
    await anyio.sleep(seconds)  # the scenario itself: a step that takes this long
    row("long-done", key)
    return n * 3


@workflow(name="faults:lengthy")
async def lengthy(n: int, seconds: float) -> str:
    tripled = await long_step(n, seconds)
    return await ship(f"long-{tripled}")


def expected_lengthy(n: int) -> str:
    return f"LONG-{n * 3}"


if os.environ.get("WF_FAULT_NO_RENEW") == "1":  # R-16's negative control, test worker processes only
    # Neither the run's lease nor the queue message's idle time is renewed: a step longer
    # than the lease looks abandoned, as it would to a worker whose renewals never arrive.
    import werkfluss._worker

    async def _never(self: Any) -> None:
        await anyio.sleep_forever()

    RunExecutor._keep_lease = _never  # type: ignore[method-assign]
    werkfluss._worker.Worker._touch = _never  # type: ignore[method-assign]


# -- a run that many callers start at once ---------------------------------------------------------------------


@step(name="faults:first")
async def first(n: int) -> int:
    await work(step_key())
    await anyio.sleep(float(os.environ.get("WF_FAULT_FIRST_DELAY", "0")))  # callers pile up while it runs
    return n + 7


@workflow(name="faults:once")
async def once(n: int) -> str:
    return await ship(f"once-{await first(n)}")


def expected_once(n: int) -> str:
    return f"ONCE-{n + 7}"


# -- a hook delivered while a step is in flight ----------------------------------------------------------------


def raced_token(n: int) -> str:
    return f"raced:{n}"


@workflow(name="faults:hook-then-step")
async def hook_then_step(n: int, seconds: float) -> str:
    """A hook registered in a race it loses, a long step, then the hook again."""
    gate = hook(token=raced_token(n))
    winner, _ = await race(gate, sleep(0.01))  # the hook loses: registered, not received
    tripled = await long_step(n, seconds)  # the payload arrives while this step runs
    payload = await gate
    return await conclude(tripled + winner, payload)


@workflow(name="faults:hook-races-step")
async def hook_races_step(n: int, seconds: float) -> str:
    """A hook and a long step in one race: the payload arrives while the step runs and wins."""
    winner, value = await race(hook(token=raced_token(n)), long_step(n, seconds))
    return await conclude(winner, value)


def expected_raced(flow: str, n: int, payload: Any) -> str:
    """What an R-20 workflow returns when the payload arrives while its step runs."""
    return f"{n * 3 + 1}:{payload}" if flow == "faults:hook-then-step" else f"0:{payload}"
