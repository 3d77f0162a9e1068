"""What a run's body waits for: durable sleeps, hook payloads, races.

A timer due within `Settings.hold` seconds, and a hook payload being
looked for, are waited for in memory; anything longer is a wait the pause
detector (`_pause`) may pause the run on. Recorded timers, payloads and
race winners are replayed from the `Replay` index.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Coroutine
from datetime import datetime
from logging import DEBUG, WARNING
from typing import Any, cast

import anyio
import msgspec

from .._clock import nap
from .._errors import HookConflictError, NonDeterminismError, RunNotFoundError, SerializationError
from .._events import HookReceived, RaceWon, TimerStarted, Waiting
from .._values import decode_value
from ._cancel import cancel_run
from ._pause import Busy
from ._run import RunBase
from ._steps import StepCalls

__all__ = ["WaitCalls"]

_POLL = 0.2  # how often a held run looks for a hook payload


class WaitCalls(RunBase):
    """What a run's body waits for: `sleep()`, a hook's next payload, `race()`."""

    async def sleep(self, seq: int, seconds: float | None = None, *, until: datetime | None = None) -> datetime | None:
        """Durable sleep number `seq`: due `seconds` after it was first reached, or at moment `until`.

        The due time is recorded when first reached, and a replay takes the
        recorded one: a moment the body computes from the clock is not computed
        again. Returns the recorded moment for `until` (in its timezone), else None.
        """
        due = await self._sleep(seq, seconds, None if until is None else until.timestamp())
        return None if until is None else datetime.fromtimestamp(due, until.tzinfo)

    async def _sleep(self, seq: int, seconds: float | None, until: float | None) -> float:
        self.check(seq, "sleep")
        due = self.replay.timers.get(seq)
        if due is None:
            if not self.live:
                await self._history_ends(seq)
            await self._checkpoint()
            # On the server's clock, as the timer set is: a skewed worker fires it neither early nor late.
            due = until if until is not None else self.store.now() + (seconds or 0.0)
            await self.record(f"t{seq}", TimerStarted(time.time(), seq, due))
            self.replay.timers[seq] = due
        if not self.live:
            return due  # a replay check does not wait for a recorded timer
        hold, prefix = self.settings.hold, self.store.prefix
        while True:
            left = due - self.store.now()
            if left <= 0:
                return due
            if left <= hold:
                with Busy(self._activity):
                    await nap(prefix, left, due=due, held=True)
                continue
            with self._activity.waiting(Waiting("timer", due=due)):
                await nap(prefix, left - hold, due=due - hold)

    async def receive(self, seq: int, token: str, n: int, type_: Any) -> Any:
        """Payload number `n` of hook `seq`: recorded, waiting in its mailbox, or awaited."""
        self.check(seq, f"hook:{token}")
        recorded = self.replay.hooks.get((seq, n))
        if recorded is not None:
            value = decode_value(recorded.payload, type_, owner=f"hook {token!r}", where="payload")
            if self.live and recorded.entry == self.replay.cursors.get(token):
                await self._tidy(token, recorded.entry)
            return value
        if not self.live:
            return await self._history_ends(seq)
        await self._checkpoint()
        while True:
            kind, entry, payload = await self.store.take(token, self.run_id, self.cursors.get(token, "0-0"))
            if kind == "conflict":
                raise HookConflictError(token, self.run_id, entry)
            if kind == "payload":
                try:
                    if payload is None:
                        raise SerializationError(f"hook {token!r}: the mailbox entry has no payload field")
                    value = decode_value(payload, type_, owner=f"hook {token!r}", where="payload")
                except SerializationError as exc:
                    await self._reject(token, entry, str(exc))
                    continue
                event = HookReceived(time.time(), seq, token, n, entry, msgspec.Raw(payload))
                await self.record(f"h{seq}:{n}", event)
                # A racer that lost after taking this payload leaves it to the next await, as a replay would.
                self.replay.hooks[(seq, n)] = event
                self.cursors[token] = entry
                with Busy(self._activity):
                    await self.store.consumed(token, entry)
                message = "run %s: hook %r delivered payload %d"
                self._note(DEBUG, "hook.received", message, token, n, seq=seq, step=f"hook:{token}")
                return value
            with self._activity.waiting(Waiting("hook", token=token)):
                await anyio.sleep(_POLL)

    async def _tidy(self, token: str, entry: str) -> None:
        """Remove a recorded payload from its mailbox, once per run and token.

        A payload leaves the mailbox right after its `HookReceived` is
        recorded; a process that died in between left it there, so the
        latest recorded entry of each token is removed again (idempotent).
        """
        if self._tidied.get(token) != entry:
            self._tidied[token] = entry
            with Busy(self._activity):
                await self.store.consumed(token, entry)

    async def _reject(self, token: str, entry: str, reason: str) -> None:
        """Move a payload that does not decode to the dead letters; the run waits on.

        Payloads sent with `invoke_hook` always decode; this one was written
        some other way, or to the wrong hook. It must not fail the run.
        """
        with Busy(self._activity):
            await self.store.bury(self.run_id, f"hook {token} entry {entry}", reason)
            await self.store.consumed(token, entry)
        self.cursors[token] = entry
        message = "run %s: hook %r entry %s moved to the dead letters: %s"
        self._note(WARNING, "hook.rejected", message, token, entry, reason)

    async def race(self, seq: int, awaitables: list[Awaitable[Any]]) -> tuple[int, Any]:
        """The first of `awaitables` to finish; the winner is recorded and replayed."""
        try:
            self.check(seq, "race")
        except NonDeterminismError:
            _close(awaitables)  # never to be awaited: no "never awaited" warnings
            raise
        children = {i: child for i, awaitable in enumerate(awaitables) if (child := _child_run(awaitable))}
        index = self.replay.races.get(seq)
        if index is not None:
            _close(awaitables, but=index)
            if self.live:  # the process that recorded the winner may have died before the losers were cancelled
                await self._cancel_losers(seq, children, index)
            return index, await awaitables[index]
        if not self.live:
            for awaitable in awaitables:
                close = getattr(awaitable, "close", None)
                if close is not None:
                    close()
            return cast("tuple[int, Any]", await self._history_ends(seq))
        ready = next((i for i, awaitable in enumerate(awaitables) if self._ends_from_log(awaitable)), None)
        if ready is not None:
            # The log has a racer's outcome but not the winner (the process died in between):
            # that racer wins, and no other starts, since a step would execute again only to lose.
            _close(awaitables, but=ready)
            error: BaseException | None = None
            try:
                value = await awaitables[ready]
            except Exception as exc:
                value, error = None, exc
            await self.record(f"r{seq}", RaceWon(time.time(), seq, ready))
            self.replay.races[seq] = ready
            await self._cancel_losers(seq, children, ready)
            if error is not None:
                raise error
            return ready, value
        won: list[tuple[int, Any, BaseException | None]] = []

        async def run(i: int, awaitable: Awaitable[Any], scope: anyio.CancelScope) -> None:
            try:
                value = await awaitable
            except Exception as exc:
                if not won:
                    won.append((i, None, exc))
            else:
                if not won:
                    won.append((i, value, None))
            scope.cancel()

        async with anyio.create_task_group() as tg:
            for i, awaitable in enumerate(awaitables):
                tg.start_soon(run, i, awaitable, tg.cancel_scope)
        # Without a winner every racer was cancelled from outside, and leaving the
        # task group above re-raised that cancellation.
        assert won
        index, value, error = won[0]
        await self.record(f"r{seq}", RaceWon(time.time(), seq, index))
        self.replay.races[seq] = index
        await self._cancel_losers(seq, children, index)
        if error is not None:
            raise error
        return index, value

    async def _cancel_losers(self, seq: int, children: dict[int, str], winner: int) -> None:
        """Cancel the child runs that lost race `seq`: a child that had paused (on a hook,
        a long sleep) would otherwise stay paused with nobody to wait for it."""
        for i, child in children.items():
            if i == winner:
                continue
            with Busy(self._activity):
                try:
                    await cancel_run(self.store, child, f"it lost race #{seq} of run {self.run_id!r}")
                except RunNotFoundError:
                    pass  # it never started: nothing to cancel

    def _ends_from_log(self, awaitable: Awaitable[Any]) -> bool:
        """Whether racer `awaitable` (a step, child, sleep or hook of this run, not started
        yet) ends from the log alone: its outcome is recorded, or its timer is due."""
        code = getattr(awaitable, "cr_code", None)
        frame = getattr(awaitable, "cr_frame", None)
        if code is None or frame is None:
            return False
        local = frame.f_locals
        if code is StepCalls.run_step.__code__ or code is StepCalls.run_child.__code__:
            return local["seq"] in self.replay.completed or local["seq"] in self.replay.failed
        if code is WaitCalls.sleep.__code__:
            due = self.replay.timers.get(local["seq"])
            return due is not None and due <= self.store.now()
        hook = local.get("self")
        if code.co_qualname == "Hook._next" and hook is not None:
            return (hook.seq, hook._received + 1) in self.replay.hooks
        return False


def _child_run(awaitable: Awaitable[Any]) -> str | None:
    """The run ID of racer `awaitable` if it is a child workflow's call not started yet."""
    code = getattr(awaitable, "cr_code", None)
    frame = getattr(awaitable, "cr_frame", None)
    if code is not StepCalls.run_child.__code__ or frame is None:
        return None
    child = frame.f_locals.get("child_id")
    return child if isinstance(child, str) else None


def _close(awaitables: list[Awaitable[Any]], *, but: int | None = None) -> None:
    """Close the coroutines among `awaitables` (but number `but`): they are never awaited."""
    for i, awaitable in enumerate(awaitables):
        if i != but and isinstance(awaitable, Coroutine):
            awaitable.close()
