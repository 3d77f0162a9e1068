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
jump to the earliest due time when nothing else is going on.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

__all__ = ["Sleeper", "advance", "nap", "set_skew", "skew", "sleepers"]

_skews: dict[str, float] = {}  # key prefix -> seconds the test clock is ahead of the server's
_sleepers: dict[str, set[Sleeper]] = {}
_lock = threading.Lock()  # advances may come from another thread (a blocking test) than the sleepers'


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
    """Move prefix `prefix`'s clock `seconds` further ahead; returns the new skew."""
    with _lock:
        new = _skews.get(prefix, 0.0) + seconds
    set_skew(prefix, new)
    return new


def sleepers(prefix: str) -> list[Sleeper]:
    """The waits in this process on prefix `prefix`'s clock, right now."""
    with _lock:
        return list(_sleepers.get(prefix, ()))


async def nap(prefix: str, seconds: float, *, due: float | None = None) -> None:
    """Sleep up to `seconds` of real time, or until prefix `prefix`'s clock is moved.

    `due`: the clock time this wait is for, when it waits for one (a timer,
    a tick), so that an auto-advancing test clock can jump there. Callers
    loop, comparing the clock with their due time: a nap may end early.
    """
    if seconds <= 0:
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
