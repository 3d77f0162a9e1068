"""The fuzzer's workflow programs: a small tree of msgspec Structs, and `to_python`.

A program is data, not generated source: worker processes receive its body as a
workflow argument (`tests.fuzz.programs.interpret`) and interpret it, so every
process runs the same fixed, importable workflow. A body is a list of statements;
each binds its value to a variable and appends ``"<var>=<repr(value)>"`` to the
run's *trace*, which is the workflow's result. `repr` tells a tuple from a list, a
dataclass from a dict and keeps dict order, so any difference between a live run,
a replay and the reference shows in the trace.

What the outside world does (hook payloads delivered early, late, or twice) is
not part of the body: it lives in `Program.hooks`, next to the workflow's
arguments `Program.data`.

`to_python` prints a program as the workflow a developer would have written, to
paste into a test.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "Await",
    "Body",
    "Call",
    "Child",
    "Data",
    "Gather",
    "Group",
    "HookArm",
    "HookScript",
    "Loop",
    "NewHook",
    "Program",
    "Race",
    "Sleep",
    "SleepArm",
    "StepArm",
    "StepCall",
    "Try",
    "to_python",
]

# Step kinds, each a fixed step in tests/fuzz/programs.py:
#   plain: returns a str; nested: a dataclass holding msgspec Structs; counts: a dict with unsorted
#   keys; tags: annotated list[str], returns a tuple; flaky: fails its first `fail_first` executions
#   (fail_first <= its retries, so it always succeeds); broken: fails every attempt (StepFailedError);
#   slow: takes 5 s, used only as a race arm that loses.
#   send: delivers `payload` to hook `token` from inside the step (a webhook that calls back at once).
Kind = Literal["plain", "nested", "counts", "tags", "flaky", "broken", "slow", "send"]
FLAKY_RETRIES = 2  # retries of the flaky step; fail_first is at most this
BROKEN_RETRIES = 1  # the broken step is retried once, then fails for good


class StepCall(msgspec.Struct, frozen=True):
    """One call of a step: ``<kind>(label, [inputs...])``; `label` names the call site."""

    kind: Kind
    label: str
    inputs: tuple[str, ...] = ()  # variables bound earlier, passed as a list
    fail_first: int = 0  # flaky only
    token: str = ""  # send only: where to deliver
    payload: str = ""


class Call(msgspec.Struct, frozen=True, tag="call"):
    """``var = await step(...)``"""

    var: str
    call: StepCall


class Gather(msgspec.Struct, frozen=True, tag="gather"):
    """``var = list(await asyncio.gather(step(...), ...))``"""

    var: str
    calls: tuple[StepCall, ...]


class Group(msgspec.Struct, frozen=True, tag="group"):
    """An ``asyncio.TaskGroup`` of step calls; ``var`` is the list of their results."""

    var: str
    calls: tuple[StepCall, ...]


class Loop(msgspec.Struct, frozen=True, tag="loop"):
    """``var = [await step(label, [item]) for item in <workflow argument source>]``"""

    var: str
    source: Literal["mapping", "names", "pair"]
    call: StepCall


class NewHook(msgspec.Struct, frozen=True, tag="hook"):
    """``handle = hook(token)``: awaited later by `Await` or raced by `HookArm`."""

    handle: str
    token: str


class Await(msgspec.Struct, frozen=True, tag="await"):
    """``var = await handle``: the hook's next payload."""

    var: str
    handle: str


class StepArm(msgspec.Struct, frozen=True, tag="step"):
    call: StepCall


class HookArm(msgspec.Struct, frozen=True, tag="hook"):
    handle: str


class SleepArm(msgspec.Struct, frozen=True, tag="sleep"):
    seconds: float


Arm = StepArm | HookArm | SleepArm


class Race(msgspec.Struct, frozen=True, tag="race"):
    """``var = await race(...)``: ``(index, value)`` of the winner.

    The generator makes the winner certain: at most one arm is *fast* (a step that is
    not slow, or a hook with a payload waiting), at most one is a sleep (which loses
    to a fast arm by >= 0.5 s), and the others never finish within the race."""

    var: str
    arms: tuple[Arm, ...]


class Sleep(msgspec.Struct, frozen=True, tag="sleep"):
    """``await sleep(seconds)``"""

    seconds: float


class Try(msgspec.Struct, frozen=True, tag="try"):
    """Step calls in ``try: ... except StepFailedError as exc:``; the handler traces the error."""

    var: str
    body: tuple[Call, ...]


class Child(msgspec.Struct, frozen=True, tag="child"):
    """``var = await child(Body(...), mapping, names, pair)``: a child workflow run."""

    var: str
    body: Body


Stmt = Call | Gather | Group | Loop | NewHook | Await | Race | Sleep | Try | Child


class Body(msgspec.Struct, frozen=True):
    """What the workflow interprets (its first argument)."""

    stmts: tuple[Stmt, ...]


class Data(msgspec.Struct, frozen=True):
    """The workflow's other arguments: a dict in generated (unsorted) key order, a list, a tuple."""

    mapping: dict[str, int]
    names: list[str]
    pair: tuple[str, ...]


class HookScript(msgspec.Struct, frozen=True):
    """What the outside world sends to `token`: `early` before the run starts; each group of
    `late` at once when the run waits on the token and nothing else. A group of two equal
    payloads is a delivery made twice."""

    token: str
    early: tuple[str, ...] = ()
    late: tuple[tuple[str, ...], ...] = ()


class Program(msgspec.Struct, frozen=True):
    body: Body
    data: Data
    hooks: tuple[HookScript, ...] = ()


# -- printing ---------------------------------------------------------------------------------------------------------


def _call(c: StepCall) -> str:
    args = [repr(c.label), "[" + ", ".join(c.inputs) + "]"]
    if c.kind == "flaky":
        args.append(f"fail_first={c.fail_first}")
    if c.kind == "send":
        args += [repr(c.token), repr(c.payload)]
    return f"{c.kind}({', '.join(args)})"


def _arm(arm: Arm) -> str:
    if isinstance(arm, StepArm):
        return _call(arm.call)
    if isinstance(arm, HookArm):
        return arm.handle
    return f"sleep({arm.seconds!r})"


def _lines(stmts: tuple[Stmt, ...], indent: str, children: list[str]) -> list[str]:
    out: list[str] = []
    for s in stmts:
        if isinstance(s, Call):
            out += [f"{s.var} = await {_call(s.call)}"]
        elif isinstance(s, Gather):
            out += [f"{s.var} = list(await asyncio.gather({', '.join(_call(c) for c in s.calls)}))"]
        elif isinstance(s, Group):
            out += ["async with asyncio.TaskGroup() as tg:"]
            out += [f"    t{i} = tg.create_task({_call(c)})" for i, c in enumerate(s.calls)]
            out += [f"{s.var} = [{', '.join(f't{i}.result()' for i in range(len(s.calls)))}]"]
        elif isinstance(s, Loop):
            item = "[key, value]" if s.source == "mapping" else "[item]"
            head = "key, value in mapping.items()" if s.source == "mapping" else f"item in {s.source}"
            call = f"{s.call.kind}({s.call.label!r} + '/' + str({'key' if s.source == 'mapping' else 'item'}), {item})"
            out += [f"{s.var} = [await {call} for {head}]"]
        elif isinstance(s, NewHook):
            out += [f"{s.handle} = hook({s.token!r})"]
            continue  # binds no traced value
        elif isinstance(s, Await):
            out += [f"{s.var} = await {s.handle}"]
        elif isinstance(s, Race):
            out += [f"{s.var} = await race({', '.join(_arm(a) for a in s.arms)})"]
        elif isinstance(s, Sleep):
            out += [f"await sleep({s.seconds!r})"]
            continue
        elif isinstance(s, Try):
            out += ["try:"]
            for c in s.body:
                out += [f"    {c.var} = await {_call(c.call)}", f"    trace.append(f'{c.var}={{{c.var}!r}}')"]
            out += [
                "except StepFailedError as exc:",
                f"    trace.append(f'{s.var}=caught {{exc.error_type}}: {{exc.error_message}}')",
            ]
            continue
        elif isinstance(s, Child):
            inner = _lines(s.body.stmts, "    ", children)
            name = f"child_{len(children) + 1}"
            children.append(_workflow(name, inner))
            out += [f"{s.var} = await {name}(mapping, names, pair)"]
        out += [f"trace.append(f'{s.var}={{{s.var}!r}}')"]
    return [indent + line for line in out]


def _workflow(name: str, body: list[str]) -> str:
    return "\n".join(
        [
            "@workflow",
            f"async def {name}(mapping: dict[str, int], names: list[str], pair: tuple[str, ...]) -> list[str]:",
            "    trace: list[str] = []",
            *body,
            "    return trace",
        ]
    )


def to_python(program: Program, fault: str = "") -> str:
    """The program as pasteable Python: the workflow (and its children), its arguments and the hook script.

    The steps (`plain`, `nested`, ..., `broken`) are the ones in tests/fuzz/programs.py."""
    children: list[str] = []
    body = _lines(program.body.stmts, "    ", children)
    d = program.data
    lines = [
        "import asyncio",
        "from werkfluss import StepFailedError, hook, race, sleep, start, workflow",
        "from tests.fuzz.programs import broken, counts, flaky, nested, plain, send, slow, tags",
        "",
        *(f"{c}\n" for c in children),
        _workflow("repro", body),
        "",
    ]
    for h in program.hooks:
        if h.early:
            lines.append(f"# before the run starts: {'; '.join(f'invoke_hook({h.token!r}, {p!r})' for p in h.early)}")
        for group in h.late:
            sent = "; ".join(f"invoke_hook({h.token!r}, {p!r})" for p in group)
            lines.append(f"# when the run waits on {h.token!r} alone: {sent}")
    if fault:
        lines.append(f"# fault: {fault}")
    lines.append(f"start(repro, {d.mapping!r}, {d.names!r}, {d.pair!r})")
    return "\n".join(lines)
