"""What a workflow can wait for: `hook()`, `sleep()`, `sleep_until()`, `race()`.

Each takes the run's next sequence number *when it is called*, like a step,
so that replays number them identically. Waiting never holds a process for
long: a run whose every branch waits is paused (its coroutine dropped) and
resumed by a replay when the awaited thing happens.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

import anyio

from ._context import RunContext, current_run, current_step
from ._errors import ConfigurationError, NotInWorkflowError
from ._ids import check_token
from ._options import parse_duration

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Coroutine, Generator
    from datetime import timedelta

__all__ = ["Hook", "hook", "race", "sleep", "sleep_until"]

T = TypeVar("T")


class _Receive(Generic[T]):
    """``hook.wait()``: awaitable once, and recognisable by `race()` as a hook's wait."""

    __slots__ = ("hook",)

    def __init__(self, hook: Hook[T]) -> None:
        self.hook = hook

    def __await__(self) -> Generator[Any, None, T]:
        return self.hook._next().__await__()


def _racer(awaitable: Awaitable[Any]) -> tuple[Awaitable[Any], Hook[Any] | None]:
    """What `race()` awaits for `awaitable`, and the hook behind it if it is one.

    A hook is raced without counting its payload as handed over; only the
    winner's is, so a hook that lost a race still returns that payload (or
    the next one) to a later ``await``, as a replay would.
    """
    hook = awaitable.hook if isinstance(awaitable, _Receive) else awaitable
    if isinstance(hook, Hook):
        return hook._next(advance=False), hook
    return awaitable, None


def _run(what: str) -> RunContext:
    run = current_run()
    if run is None:
        raise NotInWorkflowError(f"{what} can only be used in a workflow body, not in a step or outside a run")
    return run


class Hook(Generic[T]):
    """An outside event a workflow waits for; create it with `hook()`.

    ``await h`` returns the next payload delivered to ``h.token`` (kept in
    the token's mailbox if it arrived before the run got here);
    ``async for payload in h`` takes payloads one after another. Deliver
    them from anywhere with ``invoke_hook(token, payload)``.
    """

    __slots__ = ("_received", "_run", "seq", "token", "type")

    def __init__(self, run: RunContext, seq: int, token: str, type_: Any) -> None:
        self._run = run
        self.seq = seq
        self.token = token
        self.type = type_
        self._received = 0

    def wait(self) -> Awaitable[T]:
        """The next payload (recorded in the run's log, so a replay returns the same one)."""
        return _Receive(self)

    async def _next(self, *, advance: bool = True) -> T:
        # The count moves only once a payload is handed to the workflow: a wait
        # that lost a race (cancelled, or its payload taken but not returned)
        # leaves that payload for the next await, live and on replay alike.
        value: T = await self._run.runner.receive(self.seq, self.token, self._received + 1, self.type)
        if advance:
            self._received += 1
        return value

    def _advance(self) -> None:
        """Count a payload that `race()` took for this hook as handed over."""
        self._received += 1

    def __await__(self) -> Generator[Any, None, T]:
        return self._next().__await__()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self.wait()

    def __repr__(self) -> str:
        return f"<werkfluss hook {self.token!r}>"


@overload
def hook(token: str | None = None) -> Hook[Any]: ...
@overload
def hook(token: str | None = None, *, type: type[T]) -> Hook[T]: ...
def hook(token: str | None = None, *, type: Any = Any) -> Hook[Any]:
    """A hook: an outside event this workflow can await.

    Args:
        token: The name payloads are delivered to (``invoke_hook(token, ...)``).
            Default: ``"<run_id>:<seq>"``, deterministic, so hand it out
            through a step (an email, a webhook registration). A token
            belongs to one run.
        type: Decode payloads to this type (default: as sent, builtins).

    Raises:
        NotInWorkflowError: outside a workflow body.
        ConfigurationError: the token is not 1-200 characters without
            whitespace or braces.
    """
    run = _run("hook()")
    seq = run.next_seq()
    if token is None:
        token = f"{run.run_id}:{seq}"
    elif not isinstance(token, str):
        raise ConfigurationError(f"hook token must be a string, got {token!r}")
    check_token(token)
    return Hook(run, seq, token, type)


def sleep(duration: float | timedelta | str) -> Awaitable[None]:
    """Pause the workflow for `duration`: seconds, a `timedelta`, or ``"400ms"``, ``"2h"``, ``"7d"``.

    A durable timer: its due time is recorded when first reached, so the
    run resumes when it is due even if every process was restarted
    meanwhile, and a replay does not start the clock again. Short sleeps
    (up to a couple of seconds) wait in memory; longer ones pause the run.
    In a step or outside a run it is a plain ``anyio.sleep``.

    Raises:
        ConfigurationError: `duration` is not a valid, non-negative duration.
    """
    seconds = parse_duration(duration, what="sleep duration")
    run = current_run()
    if run is None or current_step() is not None:
        return anyio.sleep(seconds)
    return cast("Awaitable[None]", run.runner.sleep(run.next_seq(), seconds))


def sleep_until(moment: datetime) -> Awaitable[datetime]:
    """Pause the workflow until `moment`, an aware `datetime` (any timezone); returns the moment waited for.

    Durable like `sleep`: the moment is recorded when first reached, and the
    run resumes then even if every process was restarted meanwhile. A replay
    waits for the recorded moment and returns it, even if the body computed
    another one this time (``datetime.now()`` is later on every replay): use
    the returned moment, or compute it in a step, if the body goes on to use
    it. A moment already past returns at once. In a step or outside a run it
    is a plain sleep until then.

    Raises:
        ConfigurationError: `moment` is not a `datetime`, or it is naive (no
            timezone: which 9 o'clock would it be?).
    """
    if not isinstance(moment, datetime):
        raise ConfigurationError(f"sleep_until() needs an aware datetime, got {moment!r}")
    if moment.utcoffset() is None:
        raise ConfigurationError(
            f"sleep_until({moment.isoformat()}): the datetime is naive (no timezone); give it one, "
            f"e.g. datetime(..., tzinfo=ZoneInfo('Europe/Berlin')) or .replace(tzinfo=UTC)"
        )
    run = current_run()
    if run is None or current_step() is not None:
        return _plain_sleep_until(moment)
    # The runner's own coroutine, not a wrapper: race() recognises a sleep by it.
    return cast("Awaitable[datetime]", run.runner.sleep(run.next_seq(), until=moment))


async def _plain_sleep_until(moment: datetime) -> datetime:
    await anyio.sleep(max(moment.timestamp() - time.time(), 0.0))
    return moment


def race(*awaitables: Awaitable[Any]) -> Coroutine[Any, Any, tuple[int, Any]]:
    """The first of several steps, hooks, sleeps or child workflows to finish.

    Returns ``(index, value)`` of the winner; a winner that raised raises
    here. The winner is recorded, so a replay returns the same winner even
    if another would be ready first then. The losers are cancelled: a step
    still running is cancelled through anyio cancellation (a loser that
    completed first stays recorded but is never returned), an unreceived
    hook payload stays in its mailbox for a later ``await``.

    Raises:
        NotInWorkflowError: outside a workflow body.
        ConfigurationError: called with nothing to race.
    """
    run = _run("race()")
    if not awaitables:
        raise ConfigurationError("race() needs at least one awaitable")
    racers = [_racer(a) for a in awaitables]
    return _race(run, run.next_seq(), racers)


async def _race(run: RunContext, seq: int, racers: list[tuple[Awaitable[Any], Hook[Any] | None]]) -> tuple[int, Any]:
    index, value = await run.runner.race(seq, [awaitable for awaitable, _ in racers])
    hook = racers[index][1]
    if hook is not None:
        hook._advance()
    return index, value
