"""Run one program on werkfluss under one fault, playing the outside world.

`conduct` delivers the program's early hook payloads, starts the callers the fault
asks for (in this process, in threads, in ``start()`` script processes, in
`werkfluss worker` processes), answers late hook deliveries whenever some run waits
on hooks alone, performs the fault when a process reaches its barrier (SIGKILL, a
graceful hand-off, a server restart) and waits, polling with a deadline, until the
run is terminal. It returns what every caller saw; `tests.fuzz.check` judges it.

The fault suite's pieces do the work: `Faults` (barriers, ledger, inspection),
`Workers` (worker processes), `RedisProcess` (the restartable server).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import msgspec
import redis

from werkfluss import (
    HookClosedError,
    RunConflictError,
    StorageError,
    Worker,
    enqueue_async,
    invoke_hook_async,
    list_runs_async,
    resume_async,
    start,
    start_async,
)

from .programs import interpret

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from ..faults.harness import Faults
    from .generate import Fault
    from .program import Program

__all__ = ["HOLD", "Outcome", "World", "conduct", "outcome_of"]

HOLD = 0.3  # Settings.hold while fuzzing: sleeps longer than this pause the run
DEADLINE = 15.0  # seconds one program may take beyond its sleeps (a hang costs this much per example)

START = """
import json, sys, msgspec
from werkfluss import start
from tests.fuzz.conductor import outcome_of
from tests.fuzz.program import Program
from tests.fuzz.programs import interpret
program = msgspec.msgpack.decode(open(sys.argv[1], "rb").read(), type=Program)
run = interpret.options(run_id=sys.argv[2])
d = program.data
print(json.dumps(outcome_of(lambda: start(run, program.body, d.mapping, d.names, d.pair))))
"""


Outcome = list[Any]  # ["result", trace] | ["error", class name, error_type, error_message] | ["killed"]


def outcome_of(call: Callable[[], Any]) -> Outcome:
    """What a caller saw: its result, or its exception as plain data."""
    try:
        return ["result", call()]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # werkfluss's internals leaking out (a BaseExceptionGroup) are findings too
        return _error(exc)


def _leaves(exc: BaseException) -> list[str]:
    if isinstance(exc, BaseExceptionGroup):
        return [name for inner in exc.exceptions for name in _leaves(inner)]
    return [f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"]


def _error(exc: BaseException) -> Outcome:
    if not isinstance(exc, Exception) or isinstance(exc, ExceptionGroup):
        return ["error", type(exc).__name__, "escaped", "; ".join(_leaves(exc))]
    return [
        "error",
        type(exc).__name__,
        getattr(exc, "error_type", type(exc).__name__),
        getattr(exc, "error_message", str(exc)),
    ]


def _crash(exc: BaseException) -> BaseException | None:
    """`exc` without the cancellations in it: None when it is only a cancellation."""
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(cancelled)[1]
    return None if isinstance(exc, cancelled) else exc


@asynccontextmanager
async def _survive(world: World, name: str) -> AsyncIterator[None]:
    """Record whatever crashes out of the block (an in-process Worker dying) as `name`'s outcome."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        crash = _crash(exc)
        if crash is None:
            raise
        world.outcomes[name] = _error(crash)


@dataclass
class World:
    """One example's world: a fresh prefix and fault directory on a shared server."""

    faults: Faults
    run_id: str
    restart_server: Callable[[], None] | None = None  # SIGKILL and restart the server (restartable Redis only)
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # caller -> what it saw
    procs: list[subprocess.Popen[str]] = field(default_factory=list)  # start() scripts, reaped by `conduct`
    kills: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def settings(self) -> Any:
        return self.faults.settings

    def flow(self) -> Any:
        return interpret.options(run_id=self.run_id, settings=self.settings)


def _args(program: Program) -> tuple[Any, ...]:
    d = program.data
    return program.body, d.mapping, d.names, d.pair


async def _poll(predicate: Callable[[], Any], what: str, world: World) -> Any:
    """Poll `predicate` (sync) every 10 ms until it returns something truthy; the caller's
    `fail_after` bounds the wait. Connection errors (a server being restarted) count as not yet."""
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        await anyio.sleep(0.01)


def _terminal(world: World) -> bool:
    return world.faults.status(world.run_id) in ("completed", "failed")


async def answer_hooks(world: World, program: Program) -> None:
    """Deliver each late group of a token when some run is paused on hooks alone, that token among them.

    Each pause (a run and its `updated` time) is answered once per token, so a run that is
    woken but not yet resumed is not sent the next group too."""
    late = {h.token: list(h.late) for h in program.hooks if h.late}
    answered: set[tuple[str, Any, str]] = set()
    while any(late.values()):
        try:
            page = await list_runs_async(status="paused", limit=200, settings=world.settings)
            for run in page.runs:
                if not run.waiting or any(w.kind != "hook" for w in run.waiting):
                    continue
                for wait in run.waiting:
                    token = wait.token or ""
                    key = (run.run_id, run.updated, token)
                    if late.get(token) and key not in answered:
                        answered.add(key)
                        group = late[token].pop(0)
                        world.log.append(f"late delivery to {token}: {group}")
                        await invoke_hook_async(token, group[0], settings=world.settings)
                        for payload in group[1:]:  # the run may take the first and end before the copy arrives
                            with contextlib.suppress(HookClosedError):
                                await invoke_hook_async(token, payload, settings=world.settings)
        except (StorageError, redis.RedisError, OSError):
            pass  # the server is being restarted: look again
        await anyio.sleep(0.02)


# -- callers ----------------------------------------------------------------------------------------------------------


async def _start_here(world: World, program: Program, name: str) -> None:
    try:
        world.outcomes[name] = ["result", await start_async(world.flow(), *_args(program))]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        if _crash(exc) is None:
            raise
        world.outcomes[name] = _error(exc)


async def _start_thread(world: World, program: Program, name: str) -> None:
    flow, args = world.flow(), _args(program)
    world.outcomes[name] = await anyio.to_thread.run_sync(lambda: outcome_of(lambda: start(flow, *args)))


def _program_file(world: World, program: Program) -> str:
    path = world.faults.root / "program.msgpack"
    if not path.exists():
        path.write_bytes(msgspec.msgpack.encode(program))
    return str(path)


def _spawn_start(world: World, program: Program) -> subprocess.Popen[str]:
    proc = world.faults.python(START, _program_file(world, program), world.run_id)
    world.procs.append(proc)
    return proc


async def _finish_process(world: World, proc: subprocess.Popen[str], name: str) -> None:
    """Wait for a start() script; record its outcome (``killed`` if it was)."""
    while proc.poll() is None:
        await anyio.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode < 0:
        world.outcomes[name] = ["killed"]
        return
    lines = out.strip().splitlines()
    assert proc.returncode == 0 and lines, f"start() script {name} exited {proc.returncode}:\n{err[-3000:]}"
    world.outcomes[name] = json.loads(lines[-1])


# -- modes ------------------------------------------------------------------------------------------------------------


def _barrier_key(world: World, fault: Fault) -> str:
    return world.run_id if fault.point == "after-finish" else fault.label


async def _reached(world: World, fault: Fault) -> int | None:
    """The PID stopped at the fault's barrier, or None when the run ended without reaching it."""
    key = _barrier_key(world, fault)

    def check() -> int | bool | None:
        pid = world.faults.reached(fault.point, key)
        if pid is not None:
            return pid
        # The run's end is recorded before its process reaches after-finish: wait for that one.
        return fault.point != "after-finish" and _terminal(world) and -1

    pid = await _poll(check, f"a process at {fault.point}@{key}", world)
    return None if pid == -1 else pid


async def _kill(world: World, pid: int, procs: dict[str, subprocess.Popen[str]]) -> None:
    for proc in procs.values():
        if proc.pid == pid:
            proc.kill()  # its _finish_process task records it as killed
            proc.wait()
            break
    else:
        world.faults.kill_pid(pid)
    world.kills += 1
    world.log.append(f"SIGKILLed {pid}")


async def _handoff(world: World, program: Program, fault: Fault) -> None:
    """Worker A takes the run; when a step reaches the barrier, worker B starts, A is told to
    stop (it hands the run back at the next step boundary) and the step goes on."""
    world.faults.arm(fault.point, fault.label)
    done = anyio.Event()

    async def second() -> None:
        async with Worker(settings=world.settings, concurrency=4, grace=5):
            await done.wait()

    async with anyio.create_task_group() as tg:
        async with Worker(settings=world.settings, concurrency=4, grace=5) as first:
            await enqueue_async(world.flow(), *_args(program))
            reached = await _reached(world, fault)
            tg.start_soon(second)
            if reached is not None:
                first.stop()
                world.log.append("worker A stopping")
                world.faults.release(fault.point, fault.label)
        await _poll(lambda: _terminal(world), "the run to end", world)
        done.set()


async def _in_process(world: World, program: Program, fault: Fault) -> None:
    flow, args = world.flow(), _args(program)
    async with anyio.create_task_group() as tg:
        if fault.mode == "direct":
            tg.start_soon(_start_here, world, program, "start")
        elif fault.mode == "tasks":
            for i in range(fault.callers):
                tg.start_soon(_start_here, world, program, f"task-{i}")
        elif fault.mode == "threads":
            tg.start_soon(_start_here, world, program, "start")
            for i in range(fault.callers - 1):
                tg.start_soon(_start_thread, world, program, f"thread-{i}")
        elif fault.mode == "worker":
            async with _survive(world, "worker"), Worker(settings=world.settings, concurrency=4, grace=5):
                await enqueue_async(flow, *args)
                await _start_here(world, program, "start")
        elif fault.mode == "handoff":
            async with _survive(world, "workers"):
                await _handoff(world, program, fault)
        else:
            raise AssertionError(fault.mode)


async def _processes(world: World, program: Program, fault: Fault) -> None:
    faults, flow, args = world.faults, world.flow(), _args(program)
    procs: dict[str, subprocess.Popen[str]] = {}
    async with anyio.create_task_group() as tg:

        def launch(name: str) -> None:
            procs[name] = _spawn_start(world, program)
            tg.start_soon(_finish_process, world, procs[name], name)

        if fault.point:
            faults.arm(fault.point, _barrier_key(world, fault))
        if fault.mode == "processes":
            faults.workers.start()
            for i in range(fault.callers):
                launch(f"process-{i}")
            await enqueue_async(flow, *args)
        elif fault.mode in ("kill-start", "start-to-worker", "restart"):
            launch("start-1")
        else:  # kill-worker, worker-to-start: a worker process runs it first
            faults.workers.start()
            await enqueue_async(flow, *args)
        pid = await _reached(world, fault) if fault.point else None
        if pid is not None and fault.mode == "restart":
            assert world.restart_server is not None
            await anyio.to_thread.run_sync(world.restart_server)
            world.log.append("server restarted")
            faults.release(fault.point, _barrier_key(world, fault))
        elif pid is not None:
            if fault.mode == "kill-worker":
                faults.workers.spawn()  # the replacement claims the run after the lease
            await _kill(world, pid, procs)
            if fault.mode in ("kill-start", "worker-to-start"):
                launch("start-2")
            elif fault.mode == "start-to-worker":
                faults.workers.start()
                if not _terminal(world):
                    try:
                        await resume_async(world.run_id, settings=world.settings)
                    except RunConflictError:
                        # The killed start()'s watchdog may have put the run on the queue already:
                        # the worker can end it between the look above and the resume.
                        if not _terminal(world):
                            raise
        if fault.mode == "restart":
            await _poll(lambda: "start-1" in world.outcomes, "the first start() to return", world)
            if world.outcomes["start-1"][1:2] == ["StorageError"]:  # the outage outlasted its retries: rerun
                launch("start-2")
        await _poll(lambda: _terminal(world), "the run to end", world)


async def conduct(world: World, program: Program, fault: Fault, *, in_process: bool, seconds: float) -> None:
    """Run `program` under `fault`; fills `world.outcomes`. Fails after `DEADLINE` + `seconds`."""
    for h in program.hooks:
        for payload in h.early:
            await invoke_hook_async(h.token, payload, settings=world.settings)
    started = time.monotonic()
    try:
        with anyio.fail_after(DEADLINE + seconds):
            async with anyio.create_task_group() as tg:
                tg.start_soon(answer_hooks, world, program)
                await (_in_process if in_process else _processes)(world, program, fault)
                tg.cancel_scope.cancel()
            if world.faults.status(world.run_id) == "completed" and not {"worker", "workers"} & set(
                world.outcomes
            ):  # attach to the completed run: its decoded result
                await _start_here(world, program, "attach")
    except TimeoutError:
        statuses = {r: world.faults.status(r) for r in world.faults.all_runs()}
        raise AssertionError(
            f"the run did not end within {time.monotonic() - started:.1f} s: {statuses}\n"
            + "\n".join(world.log[-10:])
            + ("\n" + world.faults.describe_workers() if world.faults.workers.procs else "")
        ) from None
    finally:
        for proc in world.procs:  # a script still stopped at a barrier after a failure
            if proc.poll() is None:
                proc.kill()
            if proc.stdout is not None and not proc.stdout.closed:
                proc.communicate()
