"""`TestClock`: a clock for tests that skips the waits of workflows that sleep for days.

The clock timers are due by is the server's, moved ahead for one key
prefix in this process (`werkfluss._clock`): installing a `TestClock`
sets that skew to zero, `advance` moves it, leaving restores the server's
clock. Every durable sleep, `sleep_until`, delayed start and the Lua that
moves due timers follow it; leases do not (a jump in test time must not
fence out a live holder, nor a worker's lease run out).

Moving the clock wakes every wait for a due time in this process (they nap
through `_clock.nap`) and pushes a nudge to the timer loop of every queue
partition, so workers move the timers that came due at once.

The clock keeps a thread of its own, with its own event loop and
connection: a blocking test (``start()`` runs its own loop in the test's
thread) and an async one are served alike, and in auto mode that thread
watches for the moments to skip: nothing in this process works
(`_clock.TALLY`: no step executing, no record being written, no run being
taken up) for a quiet moment, nothing is queued or due now, and something
waits for a due time later. It then jumps to the earliest such time.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, final

import anyio

from ._clock import TALLY, installed, set_skew, skew, sleepers
from ._clock import advance as advance_clock
from ._errors import ConfigurationError
from ._logging import log
from ._options import Settings, parse_duration
from ._queues import all_tags, declared_queues, tags_of
from ._schedules import declared_schedules, tick_time
from ._store._keys import DELAYED, GROUP, NUDGE, QUEUE, TIMERS, WAIT
from ._store._open import close_stores, open_store

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from concurrent.futures import Future
    from types import TracebackType

    from ._store import RedisStore

__all__ = ["TestClock"]

T = TypeVar("T")

_LOOK = 0.005  # seconds between looks for a moment to skip (auto mode)
_SCAN = 100  # timer entries read per queue partition when looking for the earliest due one
_WAITING = frozenset({"paused", "pending"})  # runs whose timer entry is a wake-up, not a running run's watchdog
_CALL_TIMEOUT = 30.0  # seconds a call waits for the clock's thread


@final
class TestClock:
    """A clock for tests: durable sleeps, `sleep_until` and delayed starts skip ahead.

    ::

        async with TestClock(werkfluss_settings):  # auto mode: waits are skipped
            assert await start_async(onboarding, "u1") == "done"  # sleeps 7 days

        with TestClock(settings, auto=False) as clock:  # manual: time moves when told
            run_id = enqueue(onboarding, "u1")
            clock.advance("7d")

    While it is installed, the clock timers are due by runs ahead of the
    server's for `settings.prefix` in this process: `sleep("7d")` records a
    due time 7 days ahead on it, and the run resumes when the test clock
    gets there. Leases stay on the server's real clock. Leaving the block
    restores the server's clock. The workflows' code does not change.

    In auto mode (the default) the clock jumps to the earliest due time
    whenever nothing in this process is working (no step executing, no run
    being taken up, nothing queued) and something waits for a due time: a
    durable sleep, a paused run's timer, a delayed start. A run that only
    waits on a hook is not skipped past: nothing is due. In manual mode
    (``auto=False``) time moves only by `advance`, `advance_to`,
    `next_timer` and `next_tick` (a schedule's next tick). Every method is
    a plain call, in async and blocking tests alike; `next_timer` reads the
    server (two round trips per queue partition, on the clock's connection).

    Args:
        settings: Whose clock (its key prefix) and which server; default
            `Settings.from_env()`.
        auto: Skip waits by itself (default True).
        at: Start the clock at this moment (an aware datetime, not in the
            server's past) instead of the server's time.
        quiet: Auto mode: seconds of real time nothing must begin in this
            process before the clock jumps (work about to begin, such as a
            run just woken and being taken up, begins within them).

    Attributes:
        settings: Whose clock it runs.
        auto: Whether it skips waits by itself.
        quiet: Auto mode's quiet time, in seconds.
        jumps: How many times it jumped by itself or by `next_timer`.

    Raises:
        ConfigurationError: a test clock already runs this prefix's clock in
            this process, `at` is naive or in the past, or `quiet` is negative.
    """

    __test__ = False  # a class named Test*: not a test for pytest to collect

    def __init__(
        self, settings: Settings | None = None, *, auto: bool = True, at: datetime | None = None, quiet: float = 0.02
    ) -> None:
        if not quiet >= 0:
            raise ConfigurationError(f"TestClock(quiet=...) must be >= 0 seconds, got {quiet!r}")
        if at is not None:
            _check_aware(at, "TestClock(at=...)")
        self.settings = settings or Settings.from_env()
        self.auto = auto
        self.quiet = quiet
        self.jumps = 0
        self._at = at
        self._skipped = 0.0
        self._installed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: RedisStore | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._moves = 0  # advances whose nudges are still being sent
        self._nudges: set[asyncio.Task[None]] = set()

    # -- installing ------------------------------------------------------------------

    def __enter__(self) -> TestClock:
        prefix = self.settings.prefix
        if self._installed or installed(prefix):
            raise ConfigurationError(f"a test clock already runs the clock of prefix {prefix!r} in this process")
        set_skew(prefix, 0.0)
        self._installed = True
        self._ready.clear()  # a clock may be installed again after it was left
        self._failure = self._store = self._loop = None
        self._thread = threading.Thread(target=self._serve, name=f"werkfluss test clock {prefix}", daemon=True)
        self._thread.start()
        self._ready.wait(_CALL_TIMEOUT)
        if self._failure is not None or self._store is None:
            self._uninstall()
            raise self._failure or ConfigurationError(f"the test clock of prefix {prefix!r} did not connect")
        if self._at is not None:
            try:
                self.advance_to(self._at)
            except BaseException:
                self._uninstall()
                raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._uninstall()

    async def __aenter__(self) -> TestClock:
        # Connecting waits on the clock's thread: off this loop, which may have work to do meanwhile.
        return await anyio.to_thread.run_sync(self.__enter__)

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await anyio.to_thread.run_sync(self._uninstall)

    def _uninstall(self) -> None:
        if not self._installed:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(_CALL_TIMEOUT)
        self._installed = False
        set_skew(self.settings.prefix, None)  # wakes the sleepers: their due times are real again

    # -- reading and moving ----------------------------------------------------------

    def time(self) -> float:
        """The test clock's time, as Unix time (the server's clock plus what was skipped)."""
        return self._connected().now()

    def now(self) -> datetime:
        """The test clock's time, as an aware UTC datetime."""
        return datetime.fromtimestamp(self.time(), UTC)

    @property
    def skipped(self) -> timedelta:
        """How far the test clock runs ahead of the server's."""
        return timedelta(seconds=skew(self.settings.prefix) if self._installed else self._skipped)

    def advance(self, duration: float | timedelta | str) -> datetime:
        """Move the clock `duration` ahead (seconds, a `timedelta`, ``"7d"``); returns the new time.

        Every wait for a due time in this process looks at the clock again at
        once, and the workers' timer loops are nudged (on the clock's own
        connection, right after this returns), so timers now due fire at once.

        Raises:
            ConfigurationError: `duration` is not a valid non-negative duration.
        """
        seconds = parse_duration(duration, what="test clock advance")
        self._connected()
        if seconds > 0:
            self._move(seconds)
        return self.now()

    def advance_to(self, moment: datetime) -> datetime:
        """Move the clock to `moment` (an aware datetime); returns the new time.

        Raises:
            ConfigurationError: `moment` is naive, or before the clock's time
                (the clock moves forward only).
        """
        _check_aware(moment, "TestClock.advance_to()")
        ahead = moment.timestamp() - self.time()
        if ahead < 0:
            raise ConfigurationError(
                f"the test clock moves forward only: {moment.isoformat()} is {-ahead:.3f} s "
                f"before its time {self.now().isoformat()}"
            )
        if ahead > 0:
            self._move(ahead)
        return self.now()

    def next_timer(self) -> datetime | None:
        """Jump to the earliest thing waiting for a due time; returns the new time, or None if nothing waits.

        What waits: a durable sleep in this process, the timer of a paused
        or pending run, a delayed start. Timers already due are left to fire
        (the clock does not move). A running run's watchdog (its wake-up
        should its process die) is not a timer to jump to.
        """
        due = self._call(self._earliest(strict=False))
        if due is None:
            return None
        ahead = due - self.time()
        if ahead > 0:
            self.jumps += 1
            self._move(ahead)
        return self.now()

    def next_tick(self, name: str) -> datetime | None:
        """Jump to the next tick of schedule `name` after the clock's time; returns the tick.

        The workers serving the schedule fire that tick at once, as they
        would at that moment: one run, with the tick as its argument. None
        (the clock unmoved) for a cron expression that never matches again.

        Raises:
            ConfigurationError: no schedule `name` is declared in this process.
        """
        declared = {s.name: s for s in declared_schedules()}
        found = declared.get(name)
        if found is None:
            known = ", ".join(repr(n) for n in declared) or "none"
            raise ConfigurationError(f"no schedule {name!r} is declared in this process (declared: {known})")
        tick = found.timing.after(int(self.time() * 1000))
        if tick is None:
            return None
        moment = tick_time(tick)
        self.advance_to(moment)
        return moment

    def _move(self, seconds: float) -> None:
        self._skipped = advance_clock(self.settings.prefix, seconds)
        loop = self._loop
        assert loop is not None
        self._moves += 1
        loop.call_soon_threadsafe(self._start_nudge)

    def _start_nudge(self) -> None:
        task = asyncio.get_running_loop().create_task(self._nudge_all())
        self._nudges.add(task)  # held: the loop keeps only a weak reference to a task
        task.add_done_callback(self._nudges.discard)

    # -- the clock's thread ----------------------------------------------------------

    def _connected(self) -> RedisStore:
        if not self._installed or self._store is None:
            raise ConfigurationError("the test clock is not installed; use 'with TestClock(settings) as clock:'")
        return self._store

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the clock's thread and wait for its result."""
        self._connected()
        assert self._loop is not None
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(_CALL_TIMEOUT)

    def _serve(self) -> None:
        try:
            anyio.run(self._main, backend="asyncio")
        except BaseException as exc:
            self._failure = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            self._store = await open_store(self.settings)
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            if self.auto:
                await self._skip_forever()
            else:
                await self._stop.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await close_stores()

    async def _skip_forever(self) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            try:
                await self._skip()
            except Exception as exc:  # the test's server went away, say: look again
                log.warning("test clock of prefix %s: cannot look for timers: %s", self.settings.prefix, exc)
            with anyio.move_on_after(_LOOK):
                await self._stop.wait()

    async def _skip(self) -> None:
        """Jump to the earliest due time if nothing works now, nor begins for `quiet` seconds."""
        seen = (TALLY.begun, TALLY.ended)
        if seen[0] != seen[1] or self._moves:
            return
        if await self._earliest(strict=True) is None:
            return
        await anyio.sleep(self.quiet)
        if (TALLY.begun, TALLY.ended) != seen:
            return
        due = await self._earliest(strict=True)  # looked up again: a sooner timer may have been set meanwhile
        if due is None or (TALLY.begun, TALLY.ended) != seen:
            return
        ahead = due - self._connected().now()
        if ahead > 0:
            self.jumps += 1
            self._move(ahead)

    async def _earliest(self, *, strict: bool) -> float | None:
        """The earliest due time (Unix, on the test clock) something waits for, or None.

        `strict` (auto mode): None also when something is due now or queued
        to run, since work is about to begin.
        """
        store, prefix = self._connected(), self.settings.prefix
        now = store.now()
        dues = [s.due for s in sleepers(prefix) if s.due is not None]
        if strict and any(due <= now for due in dues):
            return None
        for tag in await self._tags(store):
            pipe = store.client.pipeline(transaction=False)
            pipe.xlen(store.queue_key(QUEUE, tag))
            pipe.xpending(store.queue_key(QUEUE, tag), GROUP)
            pipe.hlen(store.queue_key(WAIT, tag))
            pipe.zrange(store.queue_key(TIMERS, tag), 0, _SCAN - 1, withscores=True)
            pipe.zrange(store.queue_key(DELAYED, tag), 0, 0, withscores=True)
            queued, taken, admitting, timers, delayed = await pipe.execute(raise_on_error=False)
            for reply in (queued, admitting, timers, delayed):
                if isinstance(reply, Exception):
                    raise reply
            # Acknowledged messages are deleted: the stream holds the messages not yet read, and
            # those a worker took (a worker here counts its run's work itself). No group yet: none taken.
            unread = queued - (0 if isinstance(taken, Exception) else int(taken["pending"]))
            if strict and (unread > 0 or admitting):
                return None
            # Scores are whole ms, rounded down from the due times: the end of that ms is past the due time.
            found = [(score + 1) / 1000 for _, score in delayed]
            runs = [member.decode() if isinstance(member, bytes) else str(member) for member, _ in timers]
            states = await store.states(runs, ("status",))
            found += [
                (score + 1) / 1000 for (_, score), state in zip(timers, states, strict=True) if state.status in _WAITING
            ]
            if strict and any(due <= now for due in found):
                return None
            dues += found
        return min((due for due in dues if due > now), default=None)

    async def _tags(self, store: RedisStore) -> list[str]:
        """Every queue partition's tag: the default queue's, those declared here and on the server."""
        tags = dict.fromkeys(["q", *all_tags(declared_queues())])
        for name, partitions in (await store.known_queues()).items():
            tags.update(dict.fromkeys(tags_of(name, partitions)))
        return list(tags)

    async def _nudge_all(self) -> None:
        """Nudge every queue partition's timer loop: timers may have come due."""
        store = self._connected()
        try:
            pipe = store.client.pipeline(transaction=False)
            for tag in await self._tags(store):
                key = store.queue_key(NUDGE, tag)
                pipe.lpush(key, 1)
                pipe.ltrim(key, 0, 0)  # at most one nudge waits, as the timer scripts leave it
            await pipe.execute()
        except Exception as exc:  # a nudge is a hurry-up: the timer loops look within their poll anyway
            log.warning("test clock of prefix %s: cannot nudge the timer loops: %s", self.settings.prefix, exc)
        finally:
            self._moves -= 1


def _check_aware(moment: object, what: str) -> None:
    if not isinstance(moment, datetime):
        raise ConfigurationError(f"{what} needs an aware datetime, got {moment!r}")
    if moment.utcoffset() is None:
        raise ConfigurationError(f"{what}: {moment.isoformat()} is naive (no timezone); give it one, e.g. tzinfo=UTC")
