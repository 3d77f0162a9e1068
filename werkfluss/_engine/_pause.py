"""The pause detector: what a run's body is doing, and when it may pause.

A run *pauses* when everything it is doing waits for something that is
not there yet (a hook payload, a timer more than `Settings.hold` seconds
away, a child run that paused). Each executor keeps an `Activity`: the
calls executing (`busy`), the waits that could pause the run (`waiting`),
the calls a shutdown holds back (`hold_back`), and the tasks working for
the execution (so that they can be stopped once its body ended, `reap`).
Its `watch` cancels the body once everything has been waiting for
`Settings.settle` seconds, or, when the run is being handed back, once no
call is executing any more; the executor then records the pause (`Paused`)
or hands the run back (`Released`). Stopping the body too early is
harmless: a replay redoes only what was not recorded.

`wait_for_wake` is the other half: how a caller waits while a run is
paused, until it or a child it waits for comes due.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from .._clock import TALLY, nap
from .._events import Waiting
from .._logging import log

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .._store import Store

__all__ = ["Activity", "Busy", "Paused", "Released", "wait_for_wake"]


@dataclass(frozen=True, slots=True)
class Paused:
    """The run parked; `waits` is what wakes it."""

    waits: list[Waiting]


@dataclass(frozen=True, slots=True)
class Released:
    """The run was handed back unfinished (a worker shutting down)."""


class Activity:
    """What one execution of a run's body is doing, and the watch that pauses it.

    Attributes:
        stopping: The run is being handed back (a worker shutting down): nothing new
            starts, and the body stops once no call is executing.
        paused: What the run waits for, once `watch` decided to pause it.
        closed: The body has ended: nothing more may start for this execution.
    """

    __slots__ = (
        "_changed",
        "_generation",
        "_tasks",
        "_waits",
        "active",
        "closed",
        "held",
        "parked",
        "paused",
        "run_id",
        "settle",
        "stopping",
    )

    def __init__(self, run_id: str, settle: float) -> None:
        self.run_id = run_id
        self.settle = settle  # how long everything must stay waiting before the run pauses
        self.active = 0  # steps executing, records being written, children being driven
        self.parked = 0  # calls held back at a checkpoint by a shutdown: handed back, never paused
        self.held = 0  # of those, steps between attempts, inside busy()
        self.stopping = False
        self.paused: list[Waiting] | None = None
        self.closed = False
        self._waits: dict[int, Waiting] = {}
        self._generation = 0
        self._changed = anyio.Event()
        self._tasks: dict[asyncio.Task[Any], int] = {}  # tasks inside busy()/waiting(), and how deep

    def touch(self) -> None:
        """Note a change: the watch starts counting the settling time again."""
        self._generation += 1
        if self._waits or self.stopping:  # only then may watch() act; waking it for every step costs CPU
            self._changed.set()

    def enter(self) -> asyncio.Task[Any] | None:
        """Count the current task as working for this execution (see `reap`)."""
        # A task the body started (asyncio.gather's children) can outlive the body:
        # it must not begin anything for an execution that is over.
        if self.closed:
            raise asyncio.CancelledError(f"run {self.run_id!r} stopped executing in this task's caller")
        task = asyncio.current_task()
        if task is not None:
            self._tasks[task] = self._tasks.get(task, 0) + 1
        return task

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        """Undo `enter`."""
        if task is not None:
            depth = self._tasks.pop(task, 1) - 1
            if depth > 0:
                self._tasks[task] = depth

    def busy(self, *, track: bool = True) -> Busy:
        """Mark work in progress (``with activity.busy():``): the run does not pause meanwhile."""
        return Busy(self, track=track)

    @contextmanager
    def waiting(self, wait: Waiting) -> Iterator[None]:
        """Mark a wait that may pause the run when nothing else is going on."""
        task = self.enter()
        key = id(wait)
        self._waits[key] = wait
        self.touch()
        try:
            yield
        finally:
            del self._waits[key]
            self.leave(task)
            self.touch()

    async def hold_back(self, *, held: bool) -> None:
        """Hold a call back until the body is stopped: the run is being handed back.

        `held`: the call is a step between attempts, inside `busy()`, which must
        not keep the run from being handed back.
        """
        self.parked += 1
        self.held += held
        self.touch()
        try:
            await anyio.sleep_forever()
        finally:
            self.parked -= 1
            self.held -= held

    def stop(self) -> None:
        """Hand the run back at the next step boundary; a run that only waits pauses instead."""
        self.stopping = True
        self.touch()

    async def watch(self, body: anyio.CancelScope) -> None:
        """Cancel `body` once everything in it has been waiting for a moment, deciding
        to pause (`paused`), or when stopping, once no step is executing."""
        while True:
            await self._changed.wait()
            self._changed = anyio.Event()
            if self.active > self.held or (not self._waits and not self.stopping):
                continue
            generation = self._generation
            await anyio.sleep(self.settle)
            if generation != self._generation or self.active > self.held:
                continue
            if self._waits and not self.parked:  # a call held back must run elsewhere: hand back
                self.paused = list(self._waits.values())
            elif not self.stopping:
                continue
            body.cancel()
            return

    async def reap(self, lease: float) -> None:
        """Stop the tasks that still work for this execution after its body ended.

        `asyncio.gather` hands its caller the first child's cancellation without
        waiting for the other children, and on Python 3.11 `asyncio.wait_for`
        (redis-py sends through it) loses a cancellation that meets a finished
        send: a child of the body could go on, re-drive a child run (fencing out
        the execution the next replay started) or record after the run's end.
        """
        current = asyncio.current_task()
        deadline = time.monotonic() + lease
        while left := [task for task in self._tasks if task is not current and not task.done()]:
            if time.monotonic() > deadline:
                log.warning("run %s: %d tasks of its body ignore cancellation; leaving them", self.run_id, len(left))
                return
            for task in left:
                task.cancel()  # again each round: a cancellation may have been lost
            await asyncio.wait(left, timeout=0.05)


class Busy:
    """`Activity.busy()`: a class, not a generator, since every step enters it twice
    (about 1 µs a step less than ``@contextmanager``)."""

    __slots__ = ("activity", "task", "track")

    def __init__(self, activity: Activity, *, track: bool = True) -> None:
        self.activity = activity
        self.task: asyncio.Task[Any] | None = None
        self.track = track  # remember the task for `reap` (costs a current_task() lookup)

    def __enter__(self) -> None:
        activity = self.activity
        if self.track:
            self.task = activity.enter()
        elif activity.closed:
            activity.enter()  # raises: nothing new starts for an execution that is over
        activity.active += 1
        TALLY.begun += 1  # work going on in this process: a test clock in auto mode does not skip meanwhile
        activity.touch()

    def __exit__(self, *_: object) -> None:
        activity = self.activity
        activity.active -= 1
        TALLY.ended += 1
        activity.leave(self.task)
        activity.touch()


async def wait_for_wake(store: Store, run_id: str, lease: float, *, caller: bool = False) -> None:
    """Wait while run `run_id` is paused, until it or a child it waits for comes due.

    A due timer entry is taken (pushed `lease` ahead, so that it comes due
    again if this process dies) before returning: the caller resumes the run.
    Returns at once when the run is no longer paused. `caller`: the wait of
    ``start()`` itself, outside any run's body, where a Ctrl-C must not be lost.
    """
    delay = 0.02
    tree = await _wait_tree(store, run_id)
    while await store.status(run_id) == "paused":
        now = store.now()
        found: dict[tuple[str, str], float | None] = {}
        for queue in {queue for _, queue in tree}:  # one round trip per queue, not per run
            runs = [run for run, where in tree if where == queue]
            found.update(zip(((run, queue) for run in runs), await store.due(runs, queue=queue), strict=True))
        dues = [found[entry] for entry in tree]
        for (run, queue), due in zip(tree, dues, strict=True):
            if due is not None and due <= now and await store.claim_timer(run, lease, queue=queue):
                return
        # Wake-ups by hooks arrive any time: look again soon, backing off; a timer is waited for exactly.
        soonest = min((due for due in dues if due is not None), default=None)
        if caller:
            _raise_lost_cancellation()
        await nap(store.prefix, delay if soonest is None else min(delay, max(soonest - now, 0.001)), due=soonest)
        delay = min(delay * 2, 0.5)


def _raise_lost_cancellation() -> None:
    """Raise a cancellation of this task that never arrived.

    redis-py sends each command through ``asyncio.wait_for``, which on Python
    3.11 swallows a cancellation that lands as the command completes
    (CPython gh-86296). A Ctrl-C of ``start()`` waiting on a paused run lands
    there nearly every time, right after the pause is recorded: lost, the
    script would wait on for the timer. anyio re-delivers its own cancel
    scopes' cancellations; a plain ``Task.cancel()`` (asyncio's SIGINT
    handler) is delivered once, so a request still counted is raised here.
    Only outside a run's body: inside, anyio's own scopes count requests too.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError("a cancellation that asyncio.wait_for swallowed")


async def _wait_tree(store: Store, run_id: str) -> list[tuple[str, str]]:
    """`run_id` and the paused child runs it waits for, transitively (bounded), each
    with the tag of its queue partition (where its timer lives)."""
    runs, queues = [run_id], {}
    for run in runs:
        if len(runs) >= 100:
            break
        state = await store.state(run)
        queues[run] = state.queue
        raw = state.waiting
        try:
            waits = msgspec.msgpack.decode(raw, type=list[Waiting]) if raw else []
        except (msgspec.DecodeError, ValueError, RecursionError):
            waits = []
        runs.extend(w.run for w in waits if w.kind == "child" and w.run and w.run not in runs)
    unread = [run for run in runs if run not in queues]
    for run, state in zip(unread, await store.states(unread, ("queue",)), strict=True):
        queues[run] = state.queue
    return [(run, queues[run]) for run in runs]
