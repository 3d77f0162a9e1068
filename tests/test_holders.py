"""One run executes at most once per process at a time: every caller holds a run under a
holder name of its own, and a second caller in the same process (another task, another
thread, a worker) waits for the run instead of taking it over. Also: a process never
fences itself out, `_Suspend` never reaches a caller, and no coroutine is left un-awaited.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import msgspec
import pytest

from werkfluss import Settings, Worker, enqueue_async, hook, race, sleep, start, start_async, step, workflow
from werkfluss._events import RunCompleted, RunPaused, RunResumed, StepCompleted, encode_event
from werkfluss._store._open import close_stores, open_store

from .conftest import ROOT, wait_for
from .helpers import events
from .workers import server_env

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from .conftest import Server

pytestmark = pytest.mark.slow

calls: Counter[str] = Counter()
gates: dict[str, threading.Event] = {}
RESET = (calls, gates)  # What conftest's `wf` clears before each test.
_count = threading.Lock()


def waiting_here(caplog: pytest.LogCaptureFixture, run_id: str) -> int:
    """How many callers in this process said they wait for `run_id`'s holder here."""
    wanted = f"run {run_id} is executing in this process"
    return sum(wanted in r.getMessage() for r in caplog.records)


async def until(predicate: Any, what: str, timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


@step
async def gated(label: str) -> str:
    with _count:
        calls[label] += 1
    gate = gates[label]
    await anyio.to_thread.run_sync(gate.wait, 30)
    return label.upper()


@workflow
async def gated_flow(label: str) -> str:
    first = await gated(label)
    return f"{first}!"


async def test_a_start_in_a_worker_process_waits_for_the_workers_run_instead_of_taking_it_over(
    wf: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    gates["w"] = threading.Event()
    run_id = await enqueue_async(gated_flow.options(settings=wf, run_id="r-1"), "w")
    with caplog.at_level(logging.INFO, logger="werkfluss"):
        async with Worker(settings=wf):
            await until(lambda: calls["w"] == 1, "the worker to enter the step")
            caller = asyncio.create_task(start_async(gated_flow.options(settings=wf, run_id=run_id), "w"))
            # Either the caller waits (fixed) or it took the run over and entered the step too.
            await until(lambda: waiting_here(caplog, run_id) or calls["w"] > 1, "the second caller to act")
            gates["w"].set()
            with anyio.fail_after(20):
                assert await caller == "W!"
    assert calls["w"] == 1, "the step body ran once, not twice at once"
    log = await events(wf, run_id)
    assert [type(e) for e in log].count(RunResumed) == 1  # the worker's resume from the queue; no takeover
    assert sum(isinstance(e, StepCompleted) for e in log) == 1


def test_two_threads_starting_one_run_execute_its_step_once_and_both_get_the_result(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    calls.clear()
    gates["t"] = threading.Event()
    flow = gated_flow.options(settings=settings, run_id="x")
    results: list[Any] = []

    def call() -> None:
        try:
            results.append(start(flow, "t"))
        except BaseException as exc:  # the test reports what a caller got
            results.append(exc)

    with caplog.at_level(logging.INFO, logger="werkfluss"):
        threads = [threading.Thread(target=call) for _ in range(2)]
        threads[0].start()
        deadline = time.monotonic() + 20
        while calls["t"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        threads[1].start()
        while not waiting_here(caplog, "x") and calls["t"] < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        gates["t"].set()
        for thread in threads:
            thread.join(30)
    assert results == ["T!", "T!"]
    assert calls["t"] == 1


CONTENDER = """
import json, os, sys, threading, time
from pathlib import Path
import anyio
import anyio.to_thread
from werkfluss import Settings, start, step, workflow

@step
async def first() -> int:
    with open(os.environ["WF_LEDGER"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    await anyio.sleep(1.0)
    return 1

@step
async def second(n: int) -> int:
    return n + 1

@workflow(name="holders:contended")
async def contended() -> int:
    return await second(await first())

go = Path(sys.argv[1])
Path(f"{go}.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.002)
flow = contended.options(settings=Settings.from_env(), run_id="x")
results, took = [], []

def call() -> None:
    began = time.monotonic()
    try:
        results.append(start(flow))
    except BaseException as exc:
        results.append(repr(exc))
    took.append(time.monotonic() - began)

threads = [threading.Thread(target=call) for _ in range(10)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"results": results, "slowest": max(took)}))
"""


def test_ten_threads_in_each_of_three_processes_one_execution_no_takeover_every_caller_answered(
    server: Server, prefix: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    env = server_env(server, prefix, WF_LEDGER=str(ledger))
    go = tmp_path / "go"
    command = [sys.executable, "-c", CONTENDER, str(go)]
    procs = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    try:
        wait_for(lambda: all(go.with_name(f"go.{p.pid}").exists() for p in procs), 30, "the processes to start")
        began = time.monotonic()
        go.touch()
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            outputs.append(json.loads(out))
        elapsed = time.monotonic() - began
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [o["results"] for o in outputs] == [[2] * 10] * 3, "every caller got the result"
    assert len(ledger.read_text().split()) == 1, "the first step executed once"

    async def read_log() -> list[Any]:
        try:
            return await events(server.settings(prefix), "x")
        finally:
            await close_stores()

    log = anyio.run(read_log)
    assert not [e for e in log if isinstance(e, RunResumed)], "no caller took the run over"
    # Waiters learn of the end promptly: the run takes ~1 s; polling backs off to 0.25 s.
    assert elapsed < 15, elapsed
    assert max(o["slowest"] for o in outputs) < 10


# --- a single process never fences itself ---------------------------------------------------------------------


@workflow
async def hooked_child(i: int, token: str) -> int:
    await sleep(3)  # past HOLD: the children pause, and so does their parent
    await race(hook(token=f"{token}:{i}"), sleep(3))
    return i


@workflow
async def many_children(n: int, token: str) -> int:
    values = await asyncio.gather(*(hooked_child(i, token) for i in range(n)))
    return sum(values)


BURN = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"


@pytest.fixture
def burning() -> Iterator[None]:
    """Two other processes burn CPU (bounded in time), as on a loaded machine."""
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(2)]
    yield
    for burner in burners:
        burner.kill()
        burner.wait()


async def test_a_hundred_gathered_children_under_cpu_load_never_fence_their_own_process(
    wf: Settings, burning: None
) -> None:
    with anyio.fail_after(120):
        total = await start_async(many_children.options(settings=wf, run_id="herd"), 100, wf.prefix)
    assert total == sum(range(100))
    for run_id in ["herd", *(f"herd/{i + 1}" for i in range(100))]:
        log = await events(wf, run_id)
        kinds = Counter(type(e) for e in log)
        # One process, no crash: every resume follows a pause; nothing was taken over while running.
        assert kinds[RunResumed] == kinds[RunPaused], (run_id, kinds)
        assert kinds[RunCompleted] == 1, run_id


@step
async def held_step() -> str:
    calls["held"] += 1
    gates["held-in"].set()
    await anyio.to_thread.run_sync(gates["held-go"].wait, 30)
    return "late"


@workflow
async def racing() -> str:
    _, value = await race(held_step(), sleep(60))
    return str(value)


async def test_a_takeover_during_a_race_reaches_no_caller_wrapped_in_an_exception_group(wf: Settings) -> None:
    """The fenced write happens inside race()'s task group: the caller adopts the new holder's result."""
    gates["held-in"], gates["held-go"] = threading.Event(), threading.Event()
    store = await open_store(wf)

    async def take_over_and_finish() -> None:
        await anyio.to_thread.run_sync(gates["held-in"].wait, 30)
        state = await store.state("raced")
        got = await store.acquire(
            "raced", workflow=racing.id, holder="otherhost/1/x", lease=10, started=b"",
            resumed=encode_event(RunResumed(0.0, "otherhost/1/x")), take_over=state.holder,
            args_digest=state.args,
        )  # fmt: skip
        assert got.kind == "resumed"
        gates["held-go"].set()  # the fenced-out step now tries to record its result
        raw = msgspec.msgpack.encode("winner")
        await store.complete("raced", got.epoch, raw)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take_over_and_finish)
        with anyio.fail_after(20):
            assert await start_async(racing.options(settings=wf, run_id="raced")) == "winner"
    assert calls["held"] == 1


# --- no coroutine is left un-awaited ---------------------------------------------------------------------------

HERD = """
import asyncio
from werkfluss import Settings, hook, race, sleep, start_async, workflow

@workflow(name="holders:kid")
async def kid(i: int) -> int:
    await sleep(3)
    await race(hook(token=f"herd:{i}"), sleep(3))
    return i

@workflow(name="holders:herd")
async def herd(n: int) -> int:
    return sum(await asyncio.gather(*(kid(i) for i in range(n))))

print(asyncio.run(start_async(herd.options(settings=Settings.from_env(), run_id="h"), 100)))
"""


def test_the_tasks_of_a_gathering_body_end_with_its_execution_and_leave_no_coroutine_unawaited(
    server: Server, prefix: str
) -> None:
    """Children of `asyncio.gather` that outlived their parent's execution (a lost cancellation)
    re-drove child runs and were still starting executions when the loop closed."""
    proc = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::RuntimeWarning", "-c", HERD],
        cwd=ROOT, env=server_env(server, prefix), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "never awaited" not in proc.stderr, proc.stderr[-3000:]
    assert "Task was destroyed but it is pending" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(sum(range(100)))
