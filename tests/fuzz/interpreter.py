"""One interpreter for program bodies, over two sets of primitives.

`run_body(ops, body, data)` walks the statements and calls `ops` for everything
durable: steps, hooks, races, sleeps, child workflows. `tests.fuzz.programs`
passes werkfluss's own (`step`, `hook`, `race`, `sleep`, a child `workflow`);
`reference` passes plain asyncio ones defined here: steps are plain coroutines,
hooks are queues fed from the program's hook script, a race is
``asyncio.wait(FIRST_COMPLETED)``, a sleep a twentieth of its time. The two runs
share the control flow and the step values (`value_of`), and nothing else: what
the fuzzer compares is what werkfluss adds, recording and replaying.
"""

from __future__ import annotations

import asyncio
import dataclasses
import zlib
from typing import TYPE_CHECKING, Any

import msgspec

from .program import (
    FLAKY_RETRIES,
    Await,
    Call,
    Child,
    Gather,
    Group,
    HookArm,
    Loop,
    NewHook,
    Race,
    Sleep,
    SleepArm,
    StepArm,
    Try,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterable

    from .program import Body, Data, HookScript, Program, StepCall

__all__ = ["Box", "Item", "Ops", "Refused", "reference", "run_body", "value_of"]

SLOW = 5.0  # seconds a slow step takes: it always loses its race


class Item(msgspec.Struct, frozen=True):
    name: str
    n: int


@dataclasses.dataclass(frozen=True)
class Box:
    """The nested result: a dataclass holding Structs and a tuple."""

    label: str
    items: list[Item]
    tags: tuple[str, ...]


def _digest(inputs: Iterable[Any]) -> str:
    """A short fingerprint of the inputs' reprs: a value that changed type or order changes it."""
    return f"{zlib.crc32(repr(list(inputs)).encode()):08x}"


def value_of(kind: str, label: str, inputs: list[Any]) -> Any:
    """What a step of `kind` returns (werkfluss's steps and the reference's alike)."""
    d = _digest(inputs)
    if kind == "nested":
        return Box(label, [Item(f"{label}.{i}", int(d[i], 16)) for i in range(2)], (label, d[:2]))
    if kind == "counts":
        return {"zeta": int(d[0], 16), "alpha": int(d[1], 16), label: 1}
    if kind == "tags":
        return (label, d)  # annotated list[str] in programs.py: see `reference_value`
    return f"{label}:{d}"


def reference_value(kind: str, label: str, inputs: list[Any]) -> Any:
    """What the workflow body should see: the step's value as its return annotation says.

    `tags` returns a tuple but is annotated ``-> list[str]``; a replay decodes it to a
    list, so a workflow must see a list live too, or live and replayed runs differ."""
    value = value_of(kind, label, inputs)
    return list(value) if kind == "tags" else value


class Refused(Exception):
    """The reference's StepFailedError: a step failed for good."""

    def __init__(self, error_type: str, error_message: str) -> None:
        super().__init__(f"{error_type}: {error_message}")
        self.error_type = error_type
        self.error_message = error_message


def broken_message(label: str) -> str:
    return f"{label} is broken"


class Ops:
    """The durable primitives `run_body` needs; `failure` is the exception a failed step raises."""

    failure: type[BaseException] = Exception

    def step(self, call: StepCall, label: str, inputs: list[Any]) -> Awaitable[Any]:
        raise NotImplementedError

    def hook(self, token: str) -> Any:
        raise NotImplementedError

    def await_hook(self, handle: Any) -> Awaitable[Any]:
        raise NotImplementedError

    def race(self, arms: list[Any]) -> Awaitable[tuple[int, Any]]:
        raise NotImplementedError

    def sleep(self, seconds: float) -> Awaitable[Any]:
        raise NotImplementedError

    def child(self, body: Body, data: Data) -> Awaitable[list[str]]:
        raise NotImplementedError

    def caught(self, exc: BaseException) -> str:
        return f"{exc.error_type}: {exc.error_message}"  # type: ignore[attr-defined]


async def run_body(ops: Ops, body: Body, data: Data) -> list[str]:
    """Interpret `body`; returns the trace (``"<var>=<repr(value)>"`` per statement)."""
    env: dict[str, Any] = {}
    handles: dict[str, Any] = {}
    trace: list[str] = []

    def call(c: StepCall, label: str | None = None, inputs: list[Any] | None = None) -> Awaitable[Any]:
        return ops.step(c, label or c.label, [env[v] for v in c.inputs] if inputs is None else inputs)

    def bind(var: str, value: Any) -> None:
        env[var] = value
        trace.append(f"{var}={value!r}")

    for s in body.stmts:
        if isinstance(s, Call):
            bind(s.var, await call(s.call))
        elif isinstance(s, Gather):
            bind(s.var, list(await asyncio.gather(*(call(c) for c in s.calls))))
        elif isinstance(s, Group):
            async with asyncio.TaskGroup() as tg:
                tasks: list[asyncio.Task[Any]] = [tg.create_task(call(c)) for c in s.calls]  # type: ignore[arg-type]
            bind(s.var, [t.result() for t in tasks])
        elif isinstance(s, Loop):
            if s.source == "mapping":
                items = [(f"{s.call.label}/{key}", [key, value]) for key, value in data.mapping.items()]
            else:
                items = [(f"{s.call.label}/{x}", [x]) for x in (data.names if s.source == "names" else data.pair)]
            bind(s.var, [await call(s.call, label, inputs) for label, inputs in items])
        elif isinstance(s, NewHook):
            handles[s.handle] = ops.hook(s.token)
        elif isinstance(s, Await):
            bind(s.var, await ops.await_hook(handles[s.handle]))
        elif isinstance(s, Race):
            arms: list[Any] = []
            for arm in s.arms:
                if isinstance(arm, StepArm):
                    arms.append(call(arm.call))
                elif isinstance(arm, HookArm):
                    arms.append(handles[arm.handle])
                else:
                    assert isinstance(arm, SleepArm)
                    arms.append(ops.sleep(arm.seconds))
            bind(s.var, await ops.race(arms))
        elif isinstance(s, Sleep):
            await ops.sleep(s.seconds)
        elif isinstance(s, Try):
            try:
                for c in s.body:
                    bind(c.var, await call(c.call))
            except ops.failure as exc:
                trace.append(f"{s.var}=caught {ops.caught(exc)}")
        elif isinstance(s, Child):
            bind(s.var, await ops.child(s.body, data))
    return trace


# -- the reference: plain asyncio ------------------------------------------------------------------------------------


class _RefHook:
    """A hook of the reference: payloads delivered early wait in `queue`; a lone await with
    an empty queue takes the next late group (the world answers when the run waits)."""

    def __init__(self, script: HookScript | None) -> None:
        self.queue = list(script.early) if script else []
        self.late = [list(g) for g in script.late] if script else []

    async def next(self) -> Any:
        if not self.queue:
            assert self.late, "the generator promised a payload for every lone await"
            self.queue.extend(self.late.pop(0))
        return self.queue.pop(0)

    async def racing(self) -> Any:
        """As a race arm: only a payload already there can win; otherwise wait to be cancelled."""
        if self.queue:
            return self.queue.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")  # pragma: no cover


class ReferenceOps(Ops):
    failure = Refused

    def __init__(self, scripts: dict[str, HookScript]) -> None:
        self.scripts = scripts
        self.hooks: dict[str, _RefHook] = {}

    async def step(self, call: StepCall, label: str, inputs: list[Any]) -> Any:
        await asyncio.sleep(0)
        if call.kind == "slow":
            await asyncio.sleep(SLOW * 100)
        if call.kind == "broken":
            raise Refused("ValueError", broken_message(label))
        assert call.kind != "flaky" or call.fail_first <= FLAKY_RETRIES
        if call.kind == "send":
            self.hooks[call.token].queue.append(call.payload)
        return reference_value(call.kind, label, inputs)

    def hook(self, token: str) -> _RefHook:
        self.hooks[token] = _RefHook(self.scripts.get(token))
        return self.hooks[token]

    def await_hook(self, handle: _RefHook) -> Awaitable[Any]:
        return handle.next()

    async def race(self, arms: list[Any]) -> tuple[int, Any]:
        tasks = [asyncio.ensure_future(a.racing() if isinstance(a, _RefHook) else a) for a in arms]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1, f"a race must have one certain winner, {len(done)} finished at once"
            (winner,) = done
            return tasks.index(winner), winner.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds / 20)

    def child(self, body: Body, data: Data) -> Awaitable[list[str]]:
        return run_body(self, body, data)


async def reference(program: Program) -> list[str]:
    """The program's trace in plain asyncio; raises `Refused` when a step fails uncaught."""
    return await run_body(ReferenceOps({h.token: h for h in program.hooks}), program.body, program.data)
