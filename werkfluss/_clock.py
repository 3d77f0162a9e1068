"""The clock timers are due by: the server's, which a test clock may move ahead.

Durable sleeps, delayed starts, schedules and run deadlines are due by the
server's clock (`Connection.now`, and ``TIME`` in the Lua scripts), never
by a worker's own. `werkfluss.testing.TestClock` moves that clock ahead for
one key prefix in this process, so that a test of a workflow that sleeps
for a week takes milliseconds: `skew` is how far ahead it is. Leases stay on
the server's real clock (a jump in test time must not fence a live holder).

Everything that waits for a due time in this process waits through `nap`,
which an `advance` ends at once instead of after the real time has passed.
The waiters are visible (`sleepers`), so that a test clock in auto mode can
jump to the earliest due time when nothing else is going on: what is going
on is counted in `TALLY` (a step executing, a record being written, a run
being taken up), by `Busy` and `WORKING`.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

__all__ = [
    "TALLY",
    "WORKING",
    "Sleeper",
    "Tally",
    "Work",
    "advance",
    "installed",
    "nap",
    "set_skew",
    "skew",
    "sleepers",
]

_skews: dict[str, float] = {}  # key prefix -> seconds the test clock is ahead of the server's
_sleepers: dict[str, set[Sleeper]] = {}
_lock = threading.Lock()  # advances may come from another thread (a blocking test) than the sleepers'


class Tally:
    """How much work this process has begun and ended (all threads, all prefixes).

    Counted on every step, so two plain integers, unlocked: ``+=`` on an
    attribute is not split by a thread switch on CPython's GIL (the switch
    comes at calls and backward jumps, not inside it). A test clock reads
    them from its own thread: `busy` is the work going on now, and a change
    of `begun` says work began since an earlier look.
    """

    __slots__ = ("begun", "ended")

    def __init__(self) -> None:
        self.begun = 0
        self.ended = 0

    @property
    def busy(self) -> int:
        """Work going on right now."""
        return self.begun - self.ended


TALLY = Tally()


class Work:
    """``with WORKING:`` counts the block as work in `TALLY` (reentrant, shared: it holds no state)."""

    __slots__ = ()

    def __enter__(self) -> None:
        TALLY.begun += 1

    def __exit__(self, *_: object) -> None:
        TALLY.ended += 1


WORKING = Work()


@dataclass(eq=False)
class Sleeper:
    """One wait in this process for prefix `prefix`'s clock to reach `due` (None: a poll, not a due time)."""

    prefix: str
    due: float | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None] = field(repr=False)

    def wake(self) -> None:
        """End the wait now (from any thread)."""
        self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def skew(prefix: str) -> float:
    """Seconds prefix `prefix`'s clock is ahead of the server's (0 without a test clock)."""
    return _skews.get(prefix, 0.0)


def set_skew(prefix: str, seconds: float | None) -> None:
    """Put prefix `prefix`'s clock `seconds` ahead of the server's (None: back to the server's), waking its sleepers."""
    with _lock:
        if seconds is None:
            _skews.pop(prefix, None)
        else:
            _skews[prefix] = seconds
        waiting = list(_sleepers.get(prefix, ()))
    for sleeper in waiting:
        sleeper.wake()


def advance(prefix: str, seconds: float) -> float:
    """Move prefix `prefix`'s clock `seconds` further ahead, waking its sleepers; returns the new skew."""
    with _lock:  # read and written under one hold: an auto-advancing clock's thread may advance too
        new = _skews[prefix] = _skews.get(prefix, 0.0) + seconds
        waiting = list(_sleepers.get(prefix, ()))
    for sleeper in waiting:
        sleeper.wake()
    return new


def installed(prefix: str) -> bool:
    """Whether a test clock runs prefix `prefix`'s clock in this process."""
    return prefix in _skews


def sleepers(prefix: str) -> list[Sleeper]:
    """The waits in this process on prefix `prefix`'s clock, right now."""
    with _lock:
        return list(_sleepers.get(prefix, ()))


async def nap(prefix: str, seconds: float, *, due: float | None = None, held: bool = False) -> None:
    """Sleep up to `seconds` of real time, or until prefix `prefix`'s clock is moved.

    `due`: the clock time this wait is for, when it waits for one (a timer,
    a tick), so that an auto-advancing test clock can jump there. Callers
    loop, comparing the clock with their due time: a nap may end early.
    `held`: the caller counts as work meanwhile (a short sleep inside `Busy`,
    so that its run does not pause): the nap itself is not work, or an
    auto-advancing test clock would never skip it.
    """
    if seconds <= 0:
        return
    if held:
        TALLY.ended += 1
        try:
            await nap(prefix, seconds, due=due)
        finally:
            TALLY.begun += 1
        return
    loop = asyncio.get_running_loop()
    sleeper = Sleeper(prefix, due, loop, loop.create_future())
    with _lock:
        _sleepers.setdefault(prefix, set()).add(sleeper)
    timer = loop.call_later(seconds, _resolve, sleeper.future)
    try:
        await sleeper.future
    finally:
        timer.cancel()
        with _lock:
            waiting = _sleepers.get(prefix)
            if waiting is not None:
                waiting.discard(sleeper)
                if not waiting:
                    del _sleepers[prefix]
