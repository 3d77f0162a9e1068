"""Hypothesis strategies: random programs (tests/fuzz/program.py) and the faults to run them under.

The generator keeps every program *determinate*: the reference and any fault-free or
faulty werkfluss run must produce one trace. So it tracks, per hook, how many payloads
wait in its queue (`_Hook.queued`) and how many of those may still be on their way
(`unsure`: the second copy of a delivery made twice), and it builds races with one
certain winner (see `Race`). A lone ``await`` on an empty hook gets a late delivery
group in the hook script. Uncaught failures end a top-level body only (a child's
failure message names run IDs and sequence numbers a reference cannot know).

It also lists the *sure* labels: step calls every execution of the program reaches
(not race arms, not after a failure), where a fault can be placed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from .program import (
    FLAKY_RETRIES,
    Await,
    Body,
    Call,
    Child,
    Data,
    Gather,
    Group,
    HookArm,
    HookScript,
    Loop,
    NewHook,
    Program,
    Race,
    Sleep,
    SleepArm,
    StepArm,
    StepCall,
    Try,
)

__all__ = ["IN_PROCESS", "PROCESS", "Fault", "faults_for", "programs"]

WORDS = ("kiwi", "apple", "fig", "date", "banana", "cherry", "elder")
VALUE_KINDS = ("plain", "nested", "counts", "tags", "flaky")
SLEEP_BUDGET = 3.0  # seconds of durable sleep per program at most


@dataclass
class _Hook:
    token: str
    early: list[str]
    late: list[tuple[str, ...]] = field(default_factory=list)
    queued: int = 0
    unsure: int = 0
    sent: int = 0

    def payload(self) -> str:
        self.sent += 1
        return f"{self.token}#{self.sent}"


@dataclass
class _State:
    counter: int = 0
    hooks: dict[str, _Hook] = field(default_factory=dict)  # by token
    sure: list[str] = field(default_factory=list)
    slept: float = 0.0

    def next(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"


@dataclass
class _Scope:
    """One body's variables and hook handles (a child has its own)."""

    vars: list[str] = field(default_factory=list)
    handles: dict[str, _Hook] = field(default_factory=dict)
    ended: bool = False


def _call(draw: st.DrawFn, state: _State, scope: _Scope, kinds: tuple[str, ...] = VALUE_KINDS) -> StepCall:
    kind = draw(st.sampled_from(kinds))
    inputs = tuple(draw(st.lists(st.sampled_from(scope.vars), max_size=2))) if scope.vars else ()
    fail_first = draw(st.integers(0, FLAKY_RETRIES)) if kind == "flaky" else 0
    return StepCall(kind, state.next("s"), inputs, fail_first)  # type: ignore[arg-type]


def _sleep(draw: st.DrawFn, state: _State, choices: tuple[float, ...]) -> float | None:
    left = [s for s in choices if state.slept + s <= SLEEP_BUDGET]
    if not left:
        return None
    seconds = draw(st.sampled_from(left))
    state.slept += seconds
    return seconds


def _new_hook(draw: st.DrawFn, state: _State, scope: _Scope, *, early: bool = True) -> NewHook:
    token = state.next("tok-")
    h = _Hook(token, [])
    for _ in range(draw(st.integers(0, 2)) if early else 0):
        h.early.append(h.payload())
    if len(h.early) > 0 and draw(st.booleans()):
        h.early.append(h.early[-1])  # delivered twice, before the run starts
    h.queued = len(h.early)
    state.hooks[token] = h
    handle = f"h{len(scope.handles) + 1}"
    scope.handles[handle] = h
    return NewHook(handle, token)


def _await(draw: st.DrawFn, state: _State, scope: _Scope, handle: str) -> Await:
    h = scope.handles[handle]
    if h.queued == 0:  # the run will wait on it alone: the world answers, maybe twice
        p = h.payload()
        group = (p, p) if draw(st.booleans()) else (p,)
        h.late.append(group)
        h.queued, h.unsure = len(group), len(group) - 1
    h.queued -= 1
    h.unsure = min(h.unsure, h.queued)
    return Await(state.next("v"), handle)


def _race(draw: st.DrawFn, state: _State, scope: _Scope) -> tuple[Race, list[str]] | None:
    """A race with one certain winner, and the handles of the hooks that lost it.

    The winner is a fast arm (a step, or a hook with a payload that surely waits) or, if
    there is none, the one sleep arm. Losers: slow steps, hooks without a payload, and
    next to a fast winner one sleep >= 0.6 s. A hook winner races no empty hook: while its
    payload is being fetched the run may look paused on the empty one alone, and the
    world would answer it."""
    ready = [n for n, h in scope.handles.items() if h.queued > 0 and h.unsure == 0]
    idle = [n for n, h in scope.handles.items() if h.queued == 0]
    winner = draw(st.sampled_from(["step", "sleep", *(["hook"] * bool(ready))]))
    arms: list[StepArm | HookArm | SleepArm] = []
    if winner == "step":
        arms.append(StepArm(_call(draw, state, scope, ("plain", "nested", "flaky"))))
    elif winner == "hook":
        handle = draw(st.sampled_from(ready))
        scope.handles[handle].queued -= 1
        arms.append(HookArm(handle))
        idle = []
    else:
        seconds = _sleep(draw, state, (0.05, 0.2, 0.5, 1.0))
        if seconds is None:
            return None
        arms.append(SleepArm(seconds))
    has_sleep = winner == "sleep"
    lost: list[str] = []
    for _ in range(draw(st.integers(1 if winner == "sleep" else 0, 2))):
        loser = draw(st.sampled_from([*(["hook"] * 2 * bool(idle)), "slow", *(["sleep"] * (not has_sleep))]))
        if loser == "slow":
            arms.append(StepArm(_call(draw, state, scope, ("slow",))))
        elif loser == "sleep":
            arms.append(SleepArm(draw(st.sampled_from([0.6, 1.0, 2.5]))))  # loses by >= 0.5 s; costs nothing
            has_sleep = True
        else:
            handle = draw(st.sampled_from(idle))
            idle.remove(handle)
            lost.append(handle)
            arms.append(HookArm(handle))
    order = draw(st.permutations(range(len(arms))))
    return Race(state.next("v"), tuple(arms[i] for i in order)), lost


def _stmts(draw: st.DrawFn, state: _State, scope: _Scope, size: int, depth: int) -> list:  # type: ignore[type-arg]
    out: list = []  # type: ignore[type-arg]
    choices = "call call gather group loop hook await race race sleep try child fail send lost".split()
    for _ in range(size):
        before = len(out)
        what = draw(st.sampled_from(choices))
        if what == "call":
            c = _call(draw, state, scope)
            out.append(Call(state.next("v"), c))
            state.sure.append(c.label)
        elif what in ("gather", "group"):
            calls = tuple(_call(draw, state, scope) for _ in range(draw(st.integers(2, 3))))
            out.append((Gather if what == "gather" else Group)(state.next("v"), calls))
            state.sure.extend(c.label for c in calls)
        elif what == "loop":
            source = draw(st.sampled_from(["mapping", "names", "pair"]))
            c = _call(draw, state, scope, ("plain", "nested", "flaky"))
            out.append(Loop(state.next("v"), source, c))  # type: ignore[arg-type]
        elif what == "hook" and len(scope.handles) < 3:
            out.append(_new_hook(draw, state, scope))
            if draw(st.booleans()):  # awaited at once, or left for a race and later awaits
                out.append(_await(draw, state, scope, f"h{len(scope.handles)}"))
        elif what == "await" and scope.handles:
            out.append(_await(draw, state, scope, draw(st.sampled_from(sorted(scope.handles)))))
        elif what == "race":
            made = _race(draw, state, scope)
            if made is not None:
                race, lost = made
                out.append(race)
                scope.vars.append(race.var)
                if len(lost) > 0 and draw(st.booleans()):  # the hook that lost the race is awaited after all,
                    if draw(st.booleans()):  # its payload sent by a step in between (no pause before the await)
                        h = scope.handles[lost[0]]
                        c = StepCall("send", state.next("s"), (), 0, h.token, h.payload())
                        out.append(Call(state.next("v"), c))
                        scope.vars.append(out[-1].var)
                        h.queued, h.unsure = h.queued + 1, h.queued + 1
                    out.append(_await(draw, state, scope, lost[0]))
        elif what == "lost" and len(scope.handles) < 3:
            # h = hook(t); await race(h, <a sure winner>); ...; await h  (the hook is awaited after it lost)
            new = _new_hook(draw, state, scope, early=False)
            out.append(new)
            h = scope.handles[new.handle]
            if draw(st.booleans()):
                winner: StepArm | SleepArm = StepArm(_call(draw, state, scope, ("plain", "nested", "flaky")))
            else:
                winner = SleepArm(draw(st.sampled_from([0.05, 0.2])))
            arms = [HookArm(new.handle), winner] if draw(st.booleans()) else [winner, HookArm(new.handle)]
            out.append(Race(state.next("v"), tuple(arms)))
            scope.vars.append(out[-1].var)
            if draw(st.booleans()):  # its payload sent by a step: no pause before the await
                c = StepCall("send", state.next("s"), (), 0, h.token, h.payload())
                out.append(Call(state.next("v"), c))
                scope.vars.append(out[-1].var)
                h.queued, h.unsure = 1, 1
            out.append(_await(draw, state, scope, new.handle))
        elif what == "send" and scope.handles:
            # A step delivers to a hook of this run (a webhook calling back). Never raced afterwards:
            # a kill while the step runs would deliver twice.
            handle = draw(st.sampled_from(sorted(scope.handles)))
            h = scope.handles[handle]
            c = StepCall("send", state.next("s"), (), 0, h.token, h.payload())
            out.append(Call(state.next("v"), c))
            h.queued += 1
            h.unsure = h.queued
        elif what == "sleep":
            seconds = _sleep(draw, state, (0.05, 0.1, 0.2, 0.4, 0.7, 2.5))
            if seconds is not None:
                out.append(Sleep(seconds))
        elif what == "try":
            body = []
            for _ in range(draw(st.integers(1, 3))):
                c = _call(draw, state, scope, ("plain", "flaky", "broken", "broken"))
                body.append(Call(state.next("v"), c))
                if c.kind == "broken":
                    break
                state.sure.append(c.label)
            out.append(Try(state.next("v"), tuple(body)))
            scope.vars.extend(c.var for c in body if c.call.kind != "broken")
        elif what == "child" and depth < 2:
            inner = _Scope()
            stmts = _stmts(draw, state, inner, draw(st.integers(1, 3)), depth + 1)
            if stmts:
                out.append(Child(state.next("v"), Body(tuple(stmts))))
        elif what == "fail" and depth == 0 and draw(st.integers(0, 3)) == 0:
            out.append(Call(state.next("v"), _call(draw, state, scope, ("broken",))))
            break  # nothing after an uncaught failure runs
        else:
            continue
        last = out[-1] if len(out) > before else None
        if isinstance(last, Call | Gather | Group | Loop | Await | Child) and last.var not in scope.vars:
            scope.vars.append(last.var)
    return out


@st.composite
def programs(draw: st.DrawFn, max_stmts: int = 6) -> tuple[Program, list[str]]:
    """A program and its sure labels (where faults may be placed)."""
    state = _State()
    stmts = _stmts(draw, state, _Scope(), draw(st.integers(1, max_stmts)), 0)
    keys = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3, unique=True))
    mapping = {k: i for i, k in enumerate(keys)}
    names = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3))
    pair = tuple(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=2)))
    hooks = tuple(HookScript(h.token, tuple(h.early), tuple(h.late)) for h in state.hooks.values())
    return Program(Body(tuple(stmts)), Data(mapping, names, pair), hooks), state.sure


# -- faults -----------------------------------------------------------------------------------------------------------

# In the test process: several starts in one event loop, in threads, an in-process Worker beside a start,
# a graceful hand-off between two Workers mid-run.
IN_PROCESS = ("direct", "tasks", "threads", "worker", "handoff")
# Real processes: start() scripts and `werkfluss worker` processes SIGKILLed at a barrier and replaced;
# the server SIGKILLed and restarted while a step waits at a barrier (Debian's redis-server only).
PROCESS = ("kill-start", "kill-worker", "start-to-worker", "worker-to-start", "processes", "restart")


@dataclass(frozen=True)
class Fault:
    mode: str
    point: str = ""  # fz-enter, fz-before, fz-after (label) or after-finish (the run's end)
    label: str = ""
    callers: int = 1

    def __str__(self) -> str:
        where = f" at {self.point}@{self.label or '<run>'}" if self.point else ""
        return f"{self.mode}{where}, {self.callers} caller(s)"


@st.composite
def faults_for(draw: st.DrawFn, sure: list[str], modes: tuple[str, ...]) -> Fault:
    mode = draw(st.sampled_from(modes))
    callers = draw(st.integers(2, 4)) if mode in ("tasks", "threads", "processes") else 1
    needs_point = mode in ("handoff", "kill-start", "kill-worker", "start-to-worker", "worker-to-start", "restart")
    if not needs_point:
        return Fault(mode, callers=callers)
    points = ["fz-enter", "fz-before", "fz-after"]
    if mode not in ("handoff", "restart"):
        points.append("after-finish")
    if not sure:
        points = [p for p in points if p == "after-finish"]
        if not points:
            return Fault("direct")
    point = draw(st.sampled_from(points))
    label = "" if point == "after-finish" else draw(st.sampled_from(sure))
    return Fault(mode, point, label, callers)
