"""Execute one run's workflow body for the process that holds the run, and conclude it.

`RunExecutor` is a run's `Runner` (`_context`): the calls in the body come
to it (`_steps`: steps and child runs; `_waiting`: sleeps, hooks, races;
both on `_run.RunBase`). `execute` runs the body beside two helpers (one
renews the lease, the other is the pause detector's watch, `_pause`), then
concludes the run in one place: it records how the body ended (completed,
failed, blocked, cancelled, paused) or hands the run back.

The body is stopped with anyio cancellation, never an `Exception` a user's
``except Exception`` could swallow.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any, Literal, cast

import anyio
import msgspec

from .._context import RunContext, enter_run, exit_run
from .._errors import RunNotFoundError, SerializationError, StepFailedError, StorageError, _Suspend
from .._events import ErrorInfo, RunPaused, Waiting, describe, encode_event
from .._logging import log, note
from .._options import Settings
from .._values import convert_value, encode_checked
from ._cancel import cancel_run, child_reason
from ._patches import PatchCalls
from ._pause import Paused, Released, wait_for_wake
from ._run_deadline import cancelled_error
from ._run_deadline import watch as watch_deadline
from ._steps import StepCalls, fails
from ._waiting import WaitCalls

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from .._context import WorkflowLike
    from .._store import Store
    from ._replay import Replay

# Paused, Released, wait_for_wake (_pause) and fails (_steps) are imported from here too.
__all__ = ["Body", "Exit", "Paused", "Released", "RunExecutor", "fails", "wait_for_wake"]

# How an execution of the body ends: what `_conclude` records, or does instead.
Exit = Literal["lost", "interrupted", "blocked", "completed", "cancelled", "paused", "released", "failed"]

_waits_encoder = msgspec.msgpack.Encoder()


@dataclass(slots=True)
class Body:
    """How the workflow body ended: it returned `result`, raised `error`, or was stopped."""

    returned: bool = False
    result: Any = None
    error: BaseException | None = None


class RunExecutor(PatchCalls, StepCalls, WaitCalls):
    """Runs one workflow body for a run this process holds (epoch `epoch`), and concludes it."""

    @classmethod
    def replayer(cls, workflow: WorkflowLike, run_id: str, replay: Replay) -> RunExecutor:
        """An executor that only replays `replay` (``frontier="stop"``), for a replay check:
        it stops the body where the recorded history ends, and reads and writes no store."""
        offline = cast("Store", _Offline())
        return cls(offline, workflow, run_id, 0, replay, Settings(), _no_children, frontier="stop")

    async def execute(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the workflow body until it ends or pauses, and record that.

        Returns the result, or `Paused` / `Released`.

        Raises:
            _Suspend: this process lost the run to another holder.
            NonDeterminismError: the run is parked as blocked.
            RunCancelledError: the run was cancelled.
            Exception: whatever the workflow raised; the run is failed.
        """
        if self.holding is not None:
            self.holding.executing(self)
        try:
            return await self._conclude(await self._run_body(args, kwargs))
        finally:
            if self.holding is not None:
                self.holding.stopped()  # after the run's state says so: its waiters read it next

    async def replay_body(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Body:
        """Run the body against the log alone (a `replayer`): no lease, no pause, nothing recorded."""
        outcome = Body()
        with anyio.CancelScope() as body:
            self._body = body
            token = enter_run(RunContext(self.run_id, self))
            try:
                outcome.result = await self.workflow.fn(*args, **kwargs)
                outcome.returned = True
            except Exception as exc:
                outcome.error = exc
            finally:
                exit_run(token)
        self._body = None
        return outcome

    async def _run_body(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Body:
        """Run the body beside the lease's renewals and the pause detector's watch."""
        outcome = Body()
        activity = self._activity
        body = anyio.CancelScope()
        # Created here and closed below if their tasks never ran: a task cancelled
        # before its first step (a loop shutting down) never awaits what it wraps.
        named = [(self._keep_lease(), "lease"), (activity.watch(body), "watch")]
        if self.deadline is not None:
            named.append((watch_deadline(self.store, self.deadline, self.allowed, self._deadline_passed), "deadline"))
        helpers = [helper for helper, _ in named]
        try:
            async with anyio.create_task_group() as tg:
                with body:
                    self._body = body
                    if self.cancel_reason is not None:
                        body.cancel()
                    for helper, name in named:
                        tg.start_soon(_given, helper, name=f"werkfluss {name} of run {self.run_id}")
                    token = enter_run(RunContext(self.run_id, self))
                    try:
                        outcome.result = await self.workflow.fn(*args, **kwargs)
                        outcome.returned = True
                    except _Suspend:
                        self.lost = True
                    except Exception as exc:
                        outcome.error = exc
                    except BaseExceptionGroup as group:
                        # A _Suspend raised in a task group (race(), the user's own) arrives
                        # wrapped; it must not escape as an error nobody can catch.
                        if group.subgroup(_Suspend) is not None and group.split(_UNWINDING)[1] is None:
                            self.lost = True
                        elif fails(group):
                            outcome.error = group
                        else:
                            raise
                    except BaseException as exc:
                        # sys.exit() in the body fails the run like an exception: in a worker
                        # it would otherwise kill the process and every run it executes.
                        if not fails(exc):
                            raise
                        outcome.error = exc
                    finally:
                        exit_run(token)
                activity.closed = True
                await activity.reap(self.lease)
                tg.cancel_scope.cancel()
        except BaseException:
            # Ctrl-C or an outer cancellation: let a rerun take over at once.
            activity.closed = True
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(1):
                    await activity.reap(self.lease)
                with anyio.move_on_after(2):
                    await self.store.release(self.run_id, self.epoch)
            raise
        finally:
            self._body = None
            for helper in helpers:
                if inspect.getcoroutinestate(helper) == inspect.CORO_CREATED:
                    helper.close()
        return outcome

    def _exit(self, outcome: Body) -> Exit:
        """How this execution ends, first match wins."""
        if self.lost:
            return "lost"
        if isinstance(outcome.error, StorageError):
            return "interrupted"
        if self.diverged is not None:
            return "blocked"
        if outcome.returned:
            return "completed"
        if outcome.error is None:
            if self.cancel_reason is not None:
                return "cancelled"
            if self._activity.paused is not None:
                return "paused"
            if self._activity.stopping:
                return "released"
        return "failed"

    async def _conclude(self, outcome: Body) -> Any:
        """Record how the body ended (`_exit`), and return or raise what the caller gets."""
        ending = self._exit(outcome)
        error = outcome.error
        if ending == "lost":
            raise _Suspend(self.run_id, "another process took this run over")
        if ending == "interrupted":
            # The server was out of reach longer than a write's retries: the run is
            # interrupted, not failed. Hand it back (if the server answers again) so
            # a rerun or another worker resumes it from its log.
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await self.store.release(self.run_id, self.epoch)
                except StorageError:
                    pass  # its lease runs out instead
            self._note(WARNING, "run.interrupted", "run %s interrupted: %s", error)
            assert error is not None
            raise error
        if ending == "blocked":
            assert self.diverged is not None
            info = ErrorInfo.from_exception(self.diverged)
            await self._finish(lambda: self.store.block(self.run_id, self.epoch, info, seen=self.events))
            note(WARNING, "run.blocked", self.run_id, "%s", self.diverged)
            raise self.diverged
        if ending == "completed":
            owner = self.workflow.id
            try:
                raw = encode_checked(outcome.result, owner=owner, where="result", limit=self.settings.max_payload)
                # What an attach to the completed run will decode: the caller gets the same.
                value = convert_value(raw, self.workflow.return_type(), outcome.result, owner=owner, where="result")
            except SerializationError as exc:
                error = exc  # an unfit result fails the run
            else:
                await self._finish(lambda: self.store.complete(self.run_id, self.epoch, raw, seen=self.events))
                self._note(INFO, "run.completed", "run %s (%s) completed", self.workflow.id)
                return value
        elif ending == "cancelled":
            assert self.cancel_reason is not None
            return await self.cancelled(self.cancel_reason)
        elif ending == "paused":
            assert self._activity.paused is not None
            return await self._park(self._activity.paused)
        elif ending == "released":
            await self.store.release(self.run_id, self.epoch)
            log.info("run %s handed back unfinished", self.run_id)
            return Released()
        if error is None:  # pragma: no cover - the body was cancelled from outside werkfluss
            error = RuntimeError("the workflow body was cancelled")
        seq = _failed_seq(error, self.run_id)
        info = ErrorInfo.from_exception(error)
        await self._finish(lambda: self.store.fail(self.run_id, self.epoch, info, seq=seq, seen=self.events))
        self._note(WARNING, "run.failed", "run %s (%s) failed: %s", self.workflow.id, info.type)
        raise error

    async def cancelled(self, reason: str) -> Any:
        """Record the run as cancelled, cancel the child runs it was driving, and raise
        `RunCancelledError` (`RunTimeoutError` when its deadline passed)."""
        await self._finish(lambda: self.store.mark_cancelled(self.run_id, self.epoch, reason, seen=self.events))
        message = "run %s (%s) cancelled: %s"
        self._note(INFO, "run.cancelled", message, self.workflow.id, reason or "no reason given")
        # A child driven here stopped with this body (handed back, unfinished), or waits
        # paused: either way nobody would end it now.
        for child in sorted(self.driving):
            try:
                await cancel_run(self.store, child, child_reason(self.run_id, reason))
            except (StorageError, RunNotFoundError) as exc:  # not found: it was never created
                log.warning("run %s: could not cancel its child run %s: %s", self.run_id, child, exc)
        raise cancelled_error(self.run_id, reason)

    def _deadline_passed(self, reason: str) -> None:
        """The run's deadline passed while it executes here: stop it as a cancel would."""
        if self.cancel_reason is None:  # a cancel asked for first keeps its reason
            self.request_cancel(reason)

    async def _finish(self, record: Callable[[], Awaitable[str]]) -> None:
        """Record the run's end with `record` (one of the store's complete, fail, block, mark_cancelled)."""
        # A child driven by its parent's process needs no wake-up call: the
        # parent is awaiting it. One resumed on its own wakes its parent, and
        # first sets a later wake-up in case this process dies in between.
        await self.flush_marks()  # a replay of the ended run must find them
        parent_queue = ""
        if self.parent and not self.inline:
            parent_queue = await self.store.queue_of(self.parent)
            await self.store.wake(self.parent, self.lease, queue=parent_queue)
        await record()
        self.ended = True
        self._progressed()
        if self.replay.paused:  # only a run that paused can have a timer entry left
            await self.store.unschedule(self.run_id, queue=self.queue)
        if self.parent and not self.inline:
            await self.store.wake(self.parent, queue=parent_queue)

    async def _park(self, waits: list[Waiting]) -> Any:
        """Record that the run waits for `waits`, and arrange to be woken."""
        await self.flush_marks()  # before the pause: its waits would count as passed the patch
        encoded = _waits_encoder.encode(waits)
        paused = encode_event(RunPaused(time.time(), waits))
        cancel = await self.store.pause(self.run_id, self.epoch, paused, encoded, seen=self.events)
        self._progressed()
        if cancel is not None:
            return await self.cancelled(cancel)
        # Whatever arrived between deciding to pause and parking must wake the run.
        woken = False
        for wait in waits:
            if wait.kind == "hook" and wait.token is not None:
                kind, _, _ = await self.store.take(wait.token, self.run_id, self.cursors.get(wait.token, "0-0"))
                woken = woken or kind == "payload"
            elif wait.kind == "child" and wait.run is not None:
                woken = woken or await self.store.status(wait.run) != "paused"
        dues = [w.due for w in waits if w.due is not None]
        if self.deadline is not None:
            dues.append(self.deadline)  # woken at its deadline at the latest, to be cancelled then
        if woken:
            await self.store.wake(self.run_id, queue=self.queue)
        else:
            await self.store.reschedule(self.run_id, min(dues) if dues else None, queue=self.queue)
        self.replay.paused = True
        self._note(INFO, "run.paused", "run %s (%s) paused, waiting for %s", self.workflow.id, describe(waits))
        return Paused(waits)

    async def _keep_lease(self) -> None:
        """Renew the lease every third of it; stop the body once the lease is lost: the
        run was taken over, or no renewal got through for a whole lease (the store out of
        reach), after which another process may take it over."""
        # When the last renewal that got through was sent: the server's lease runs from a
        # moment after that, so the run never believes it holds longer than it does.
        renewed = time.monotonic()
        while True:
            await anyio.sleep(self.lease / 3)
            sent = time.monotonic()
            # A renewal still unanswered when the lease runs out is abandoned: the call's
            # own deadline may come later, and the body must not go on past its lease.
            with anyio.move_on_after(renewed + self.lease - sent):
                try:
                    held, cancel = await self.store.renew(self.run_id, self.epoch, self.lease)
                except StorageError as exc:
                    if time.monotonic() - renewed < self.lease:
                        log.warning("run %s: could not renew its lease, trying again: %s", self.run_id, exc)
                        continue
                else:
                    if held:
                        renewed = sent
                        if cancel is not None:
                            self.request_cancel(cancel)
                        continue
                    self._lose("lease lost; another process may take it over, stopping here")
                    return
            unrenewed = time.monotonic() - renewed
            self._lose(
                f"lease not renewed for {unrenewed:.1f} s (the store is out of reach); "
                "another process may take it over, stopping here"
            )
            return

    def _lose(self, why: str) -> None:
        """The lease is lost: stop the body now; nothing new starts (`_checkpoint`)."""
        log.warning("run %s: %s", self.run_id, why)
        self.lost = True
        if self._body is not None:
            self._body.cancel()


def _given(coro: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None]:
    return coro


# What may accompany a _Suspend in an exception group of the body: the run is lost either way.
_UNWINDING = (_Suspend, Exception, asyncio.CancelledError)


class _Offline:
    """The store of a `RunExecutor.replayer`: it stops where the history ends, so nothing
    reaches a store; anything that does is a bug, and says so."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"an executor that only replays the log used the store ({name})")


async def _no_children(*_: Any) -> Any:  # pragma: no cover - a replayer stops before driving a child
    raise AssertionError("a replay check drives no child run")


def _failed_seq(error: BaseException, run_id: str) -> int | None:
    """The seq of the failed step behind `error`, following causes, if there is one."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StepFailedError) and current.run_id == run_id:
            return current.seq
        current = current.__cause__ or current.__context__
    return None
