"""Execute one run's workflow body for the process that holds the run.

A live step costs one round trip: its start time and arguments travel in
the same script call as its result. Replayed calls (steps, hooks, timers,
races, children) are dict lookups in the `Replay` index.

A run *pauses* when everything it is doing waits for something that is
not there yet (a hook payload, a timer more than `HOLD` seconds away, a
child run that paused). The executor then cancels the body with anyio
cancellation (never an `Exception` a user's ``except Exception`` could
swallow), records what the run waits for, and returns `Paused`; the thing
it waits for wakes the run later, and a replay picks it up where it was.
Stopping the body too early is harmless: a replay redoes only what was not
recorded.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import msgspec

from .._context import RunContext, StepContext, StepLike, WorkflowLike, enter_run, enter_step, exit_run, exit_step
from .._errors import (
    HistoryTooLargeError,
    HookConflictError,
    NonDeterminismError,
    RunCancelledError,
    SerializationError,
    StepFailedError,
    StorageError,
    _Suspend,
)
from .._events import (
    AnyEvent,
    ErrorInfo,
    HookReceived,
    RaceWon,
    RunBlocked,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunPaused,
    StepCompleted,
    StepFailed,
    TimerStarted,
    Waiting,
    call_digest,
    convert_value,
    decode_value,
    encode_call,
    encode_checked,
    encode_event,
    encode_run_call,
    first_difference,
)
from .._logging import log, note
from ._call import RunCall

DEBUG, INFO, WARNING = logging.DEBUG, logging.INFO, logging.WARNING

if TYPE_CHECKING:
    from .._holder import Holding
    from .._options import Settings
    from .._store import RedisStore
    from ._call import ChildDriver
    from ._replay import Replay

__all__ = ["HOLD", "Paused", "Released", "RunExecutor", "describe", "fails", "wait_for_wake"]

HOLD = 2.0  # a timer due this soon is waited for in memory instead of pausing the run
_SETTLE = 0.01  # how long everything must stay waiting before the run pauses
_POLL = 0.2  # how often a held run looks for a hook payload or a child's end


@dataclass(frozen=True, slots=True)
class Paused:
    """The run parked; `waits` is what wakes it."""

    waits: list[Waiting]


@dataclass(frozen=True, slots=True)
class Released:
    """The run was handed back unfinished (a worker shutting down)."""


_waits_encoder = msgspec.msgpack.Encoder()


class RunExecutor:
    """Runs one workflow body for a run this process holds (epoch `epoch`)."""

    def __init__(
        self,
        store: RedisStore,
        workflow: WorkflowLike,
        run_id: str,
        epoch: int,
        replay: Replay,
        settings: Settings,
        drive_child: ChildDriver,
        *,
        cancel: str | None = None,
        parent: str = "",
        inline: bool = False,
        holding: Holding | None = None,
    ) -> None:
        self.store = store
        self.workflow = workflow
        self.run_id = run_id
        self.epoch = epoch
        self.replay = replay
        self.settings = settings
        self.lease = settings.lease
        self.events = replay.count  # in the log, as far as this process knows
        self.warned = False  # about the history's length
        self.drive_child = drive_child
        self.lost = False
        self.diverged: NonDeterminismError | None = None
        self.cancel_reason = cancel
        self.parent = parent  # the run that started this one as a child
        self.inline = inline  # driven by the parent's own process
        self.stopping = False
        self.ended = False  # its end (completed, failed, blocked, cancelled) is recorded
        self.cursors = dict(replay.cursors)
        self._tidied: dict[str, str] = {}  # token -> recorded entry removed from its mailbox again
        self._body: anyio.CancelScope | None = None
        self._active = 0  # steps executing, records being written, children being driven
        self._parked = 0  # calls held back at a checkpoint by a shutdown: handed back, never paused
        self._held = 0  # of those, steps between attempts, inside busy()
        self._waits: dict[int, Waiting] = {}
        self._generation = 0
        self._changed = anyio.Event()
        self._paused: list[Waiting] | None = None
        self.holding = holding  # the caller's claim in this process's registry: cancel() finds us there
        self._closed = False  # the body has ended: nothing more may start for this execution
        self._tasks: dict[asyncio.Task[Any], int] = {}  # tasks inside busy()/waiting(), and how deep
        # Called once when this execution first records something (an event, a pause, its
        # end): a worker trusts a redelivered run again once it got past where it was.
        self.on_progress: Callable[[], None] | None = None

    def _progressed(self) -> None:
        if self.on_progress is not None:
            callback, self.on_progress = self.on_progress, None
            callback()

    # -- bookkeeping of what the body is doing ------------------------------------------

    def _touch(self) -> None:
        self._generation += 1
        if self._waits or self.stopping:  # only then may _watch act; waking it for every step costs CPU
            self._changed.set()

    def _enter(self) -> asyncio.Task[Any] | None:
        # A task the body started (asyncio.gather's children) can outlive the body:
        # it must not begin anything for an execution that is over.
        if self._closed:
            raise asyncio.CancelledError(f"run {self.run_id!r} stopped executing in this task's caller")
        task = asyncio.current_task()
        if task is not None:
            self._tasks[task] = self._tasks.get(task, 0) + 1
        return task

    def _leave(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            depth = self._tasks.pop(task, 1) - 1
            if depth > 0:
                self._tasks[task] = depth

    def busy(self) -> _Busy:
        """Mark work in progress (``with executor.busy():``): the run does not pause meanwhile."""
        return _Busy(self)

    @contextmanager
    def waiting(self, wait: Waiting) -> Iterator[None]:
        """Mark a wait that may pause the run when nothing else is going on."""
        task = self._enter()
        key = id(wait)
        self._waits[key] = wait
        self._touch()
        try:
            yield
        finally:
            del self._waits[key]
            self._leave(task)
            self._touch()

    def check(self, seq: int, label: str) -> None:
        """Raise `NonDeterminismError` if the log recorded something else at `seq`."""
        if self.diverged is not None:
            raise self.diverged
        recorded = self.replay.labels.get(seq)
        if recorded is not None and recorded != label:
            self.diverged = NonDeterminismError(self.run_id, seq, recorded, label)
            raise self.diverged

    async def record(self, dedup: str, event: AnyEvent) -> None:
        """Append one event to the log (fenced, first writer wins).

        Raises:
            HistoryTooLargeError: the log holds `Settings.max_history` events already.
        """
        if self.events >= self.settings.max_history:
            raise HistoryTooLargeError(self.run_id, self.events, self.settings.max_history)
        with _Busy(self, track=False):  # its caller's task is tracked already, where it matters
            n, cancel = await self.store.append(
                self.run_id, self.epoch, dedup, encode_event(event), self.lease, seen=self.events
            )  # fmt: skip
        self._progressed()
        self.events = max(self.events, n)
        if self.events >= self.settings.history_warning and not self.warned:
            self.warned = True
            note(WARNING, "run.history", self.run_id, "run %s: its log has %d events; it fails at %d (max_history)",
                 self.run_id, self.events, self.settings.max_history)  # fmt: skip
        if cancel is not None:
            self.request_cancel(cancel)

    def request_cancel(self, reason: str) -> None:
        """Stop the body at its next checkpoint; the run ends cancelled."""
        if self.cancel_reason is None:
            log.info("run %s: cancel requested (%s); stopping at the next step", self.run_id, reason or "no reason")
        self.cancel_reason = reason
        if self._body is not None:
            self._body.cancel()

    def stop(self) -> None:
        """Hand the run back at the next step boundary (a worker shutting down);
        a run that only waits pauses instead."""
        self.stopping = True
        self._touch()

    async def _checkpoint(self, *, held: bool = False) -> None:
        """Where a cancel or a shutdown takes effect, and a full log refuses more:
        before anything live runs (`held`: by a step inside `busy()`, between attempts).

        A cancel stops the body at once. A shutdown only starts nothing new: the
        steps already executing in parallel finish and are recorded, and the
        watcher hands the run back once none is left.
        """
        if self.lost:
            # Its lease is lost: a step started now could run beside another process's.
            raise _Suspend(self.run_id, "this process lost the run's lease; it starts nothing more")
        if self.events >= self.settings.max_history:
            raise HistoryTooLargeError(self.run_id, self.events, self.settings.max_history)
        if self._body is None:
            return
        if self.cancel_reason is not None:
            self._body.cancel()
            await anyio.lowlevel.checkpoint()
        elif self.stopping:
            self._parked += 1
            self._held += held
            self._touch()
            try:
                await anyio.sleep_forever()
            finally:
                self._parked -= 1
                self._held -= held

    # -- steps --------------------------------------------------------------------------

    async def run_step(self, step: StepLike, seq: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Return step `seq`'s recorded outcome, or execute it and record it."""
        self.check(seq, step.id)
        done = self.replay.completed.get(seq)
        if done is not None:
            if done.digest is not None and step.options.check_args:
                self.check_args(seq, step.id, done.digest, done.args, args, kwargs)
            note(DEBUG, "step.replayed", self.run_id, "run %s: step #%d %s replayed from the log", self.run_id, seq,
                 step.id, seq=seq, step=step.id)  # fmt: skip
            return decode_value(done.result, step.return_type(), owner=step.id, where="result")
        failed = self.replay.failed.get(seq)
        if failed is not None:
            if step.options.check_args:
                self.check_args(seq, step.id, failed.digest, None, args, kwargs)
            note(DEBUG, "step.replayed", self.run_id, "run %s: step #%d %s replayed its recorded failure",
                 self.run_id, seq, step.id, seq=seq, step=step.id)  # fmt: skip
            raise self._failure(step.id, seq, failed.attempt, failed.error, failed.error.rebuild())
        await self._checkpoint()
        with self.busy():
            return await self._execute(step, seq, args, kwargs)

    def check_args(
        self, seq: int, label: str, digest: bytes | None, recorded: bytes | None, args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:  # fmt: skip
        """Raise `NonDeterminismError` if call `seq` now has other arguments than recorded.

        Only the step's ID used to be compared, so a replay that computed another
        argument (a dict walked in another order) was silently handed the result
        recorded for the old one.
        """
        if digest is None:
            return  # recorded before digests, or by a step that opted out
        try:
            if call_digest(args, kwargs) == digest:
                return
            now = b"?"
        except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError):
            now = b""
        if not now:
            detail = "an argument cannot be stored now"
        elif recorded is None:
            detail = "their digest differs from the recorded failed call's"
        else:
            detail = first_difference(recorded, args, kwargs)
        self.diverged = NonDeterminismError(self.run_id, seq, label, label, arguments=detail)
        raise self.diverged

    async def _execute(self, step: StepLike, seq: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Before any side effect: arguments that cannot be stored fail the call here.
        args_raw = msgspec.Raw(encode_call(step.id, args, kwargs, limit=self.settings.max_payload))
        digest = call_digest(args, kwargs) if step.options.check_args else None
        policy = step.options.retry
        timeout = step.options.timeout
        attempt = self.replay.attempts.get(seq, 0)
        failures = 0
        while True:
            attempt += 1
            started = time.time()
            token = enter_step(StepContext(self.run_id, step.id, seq, attempt))
            error: BaseException | None = None
            try:
                if timeout is None:
                    result = await step.fn(*args, **kwargs)
                else:
                    with anyio.move_on_after(timeout) as scope:
                        result = await step.fn(*args, **kwargs)
                    # cancel_called, not cancelled_caught: a body that swallows the
                    # cancellation and returns has still outlived its timeout.
                    if scope.cancel_called:
                        error = TimeoutError(f"step {step.id!r} timed out after {timeout:g} s")
            except Exception as exc:
                error = exc
            except BaseException as exc:
                # sys.exit() in a step, say: a failed attempt like any other. Raised on,
                # it would kill every worker that takes the run, and never fail it.
                if not fails(exc):
                    raise
                error = exc
            finally:
                exit_step(token)
            if error is None:
                try:
                    raw = encode_checked(result, owner=step.id, where="result", limit=self.settings.max_payload)
                    # The workflow gets what a replay will decode, never the raw object:
                    # live and replayed runs must see the same value of the same type.
                    value = convert_value(raw, step.return_type(), result, owner=step.id, where="result")
                except SerializationError as exc:
                    # Retrying would return the same unfit value: a final failure, the same
                    # StepFailedError live and on every replay, and retried when the run resumes.
                    info = await self._record_failure(
                        step.id, seq, attempt, started, exc, final=True, retry_at=None, digest=digest
                    )
                    note(WARNING, "step.failed", self.run_id, "run %s: step #%d %s returned an unfit result: %s",
                         self.run_id, seq, step.id, exc, seq=seq, step=step.id)  # fmt: skip
                    raise self._failure(step.id, seq, attempt, info, exc) from exc
                event = StepCompleted(time.time(), seq, step.id, attempt, started, args_raw, msgspec.Raw(raw), digest)
                await self.record(f"c{seq}", event)
                note(DEBUG, "step.executed", self.run_id, "run %s: step #%d %s executed (attempt %d)", self.run_id,
                     seq, step.id, attempt, seq=seq, step=step.id)  # fmt: skip
                return value
            failures += 1
            retry = failures <= policy.retries and policy.retries_on(error)
            delay = policy.delay(failures) if retry else 0.0
            info = await self._record_failure(
                step.id, seq, attempt, started, error, final=not retry, retry_at=time.time() + delay if retry else None,
                digest=digest,
            )  # fmt: skip
            if not retry:
                note(WARNING, "step.failed", self.run_id, "run %s: step #%d %s failed after %d attempt(s): %s",
                     self.run_id, seq, step.id, attempt, info.type, seq=seq, step=step.id)  # fmt: skip
                raise self._failure(step.id, seq, attempt, info, error) from error
            note(INFO, "step.retrying", self.run_id, "run %s: step #%d %s attempt %d failed (%s), retrying in %.3g s",
                 self.run_id, seq, step.id, attempt, info.type, delay, seq=seq, step=step.id)  # fmt: skip
            await anyio.sleep(delay)
            await self._checkpoint(held=True)

    async def _record_failure(
        self, step_id: str, seq: int, attempt: int, started: float, error: BaseException, *, final: bool,
        retry_at: float | None, digest: bytes | None,
    ) -> ErrorInfo:  # fmt: skip
        """Record a failed attempt; returns the error as recorded."""
        info = ErrorInfo.from_exception(error)
        await self.record(
            f"f{seq}:{attempt}", StepFailed(time.time(), seq, step_id, attempt, started, info, final, retry_at, digest)
        )
        return info

    def _failure(
        self, step_id: str, seq: int, attempt: int, info: ErrorInfo, original: BaseException | None
    ) -> StepFailedError:
        return StepFailedError(
            run_id=self.run_id,
            step_id=step_id,
            seq=seq,
            attempts=attempt,
            error_type=info.type,
            error_message=info.message,
            traceback=info.traceback,
            original=original,
        )

    # -- child workflows ----------------------------------------------------------------

    async def run_child(
        self, workflow: WorkflowLike, seq: int, child_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Return child run `child_id`'s recorded result, or drive the child to its end.

        A child that pauses pauses this run too; whatever wakes the child
        (or its end) wakes this run, and the replay drives the child again.
        """
        self.check(seq, workflow.id)
        done = self.replay.completed.get(seq)
        if done is not None:
            self.check_args(seq, workflow.id, done.digest, done.args, args, kwargs)
            return decode_value(done.result, workflow.return_type(), owner=workflow.id, where="result")
        failed = self.replay.failed.get(seq)
        if failed is not None:
            self.check_args(seq, workflow.id, failed.digest, None, args, kwargs)
            raise self._failure(workflow.id, seq, failed.attempt, failed.error, failed.error.rebuild())
        await self._checkpoint()
        encoded = encode_run_call(workflow.id, args, kwargs, limit=self.settings.max_payload)
        digest = call_digest(args, kwargs)
        started = time.time()
        while True:
            try:
                with self.busy():
                    call = RunCall(
                        store=self.store,
                        workflow=workflow,
                        run_id=child_id,
                        args=args,
                        kwargs=kwargs,
                        encoded=encoded,
                        settings=self.settings,
                        parent=self.run_id,
                    )
                    outcome = await self.drive_child(call)
            except (_Suspend, NonDeterminismError):
                raise
            except Exception as exc:
                attempt = self.replay.attempts.get(seq, 0) + 1
                info = await self._record_failure(
                    workflow.id, seq, attempt, started, exc, final=True, retry_at=None, digest=digest
                )
                raise self._failure(workflow.id, seq, attempt, info, exc) from exc
            if not isinstance(outcome, Paused):
                break
            with self.waiting(Waiting("child", run=child_id)):
                await wait_for_wake(self.store, child_id, self.lease)
        raw = encode_checked(outcome, owner=workflow.id, where="result", limit=self.settings.max_payload)
        attempt = self.replay.attempts.get(seq, 0) + 1
        event = StepCompleted(
            time.time(), seq, workflow.id, attempt, started, msgspec.Raw(encoded[0]), msgspec.Raw(raw), digest
        )
        await self.record(f"c{seq}", event)
        return outcome

    # -- timers, hooks, races -----------------------------------------------------------

    async def sleep(self, seq: int, seconds: float) -> None:
        """Durable sleep number `seq`: due `seconds` after it was first reached."""
        self.check(seq, "sleep")
        due = self.replay.timers.get(seq)
        if due is None:
            await self._checkpoint()
            # On the server's clock, as the timer set is: a skewed worker fires it neither early nor late.
            due = self.store.now() + seconds
            await self.record(f"t{seq}", TimerStarted(time.time(), seq, due))
            self.replay.timers[seq] = due
        while True:
            left = due - self.store.now()
            if left <= 0:
                return
            if left <= HOLD:
                with self.busy():
                    await anyio.sleep(left)
                continue
            with self.waiting(Waiting("timer", due=due)):
                await anyio.sleep(left - HOLD)

    async def receive(self, seq: int, token: str, n: int, type_: Any) -> Any:
        """Payload number `n` of hook `seq`: recorded, waiting in its mailbox, or awaited."""
        self.check(seq, f"hook:{token}")
        recorded = self.replay.hooks.get((seq, n))
        if recorded is not None:
            value = decode_value(recorded.payload, type_, owner=f"hook {token!r}", where="payload")
            if recorded.entry == self.replay.cursors.get(token):
                await self._tidy(token, recorded.entry)
            return value
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
                with self.busy():
                    await self.store.consumed(token, entry)
                note(DEBUG, "hook.received", self.run_id, "run %s: hook %r delivered payload %d", self.run_id, token,
                     n, seq=seq, step=f"hook:{token}")  # fmt: skip
                return value
            with self.waiting(Waiting("hook", token=token)):
                await anyio.sleep(_POLL)

    async def _tidy(self, token: str, entry: str) -> None:
        """Remove a recorded payload from its mailbox, once per run and token.

        A payload leaves the mailbox right after its `HookReceived` is
        recorded; a process that died in between left it there, so the
        latest recorded entry of each token is removed again (idempotent).
        """
        if self._tidied.get(token) != entry:
            self._tidied[token] = entry
            with self.busy():
                await self.store.consumed(token, entry)

    async def _reject(self, token: str, entry: str, reason: str) -> None:
        """Move a payload that does not decode to the dead letters; the run waits on.

        Payloads sent with `invoke_hook` always decode; this one was written
        some other way, or to the wrong hook. It must not fail the run.
        """
        with self.busy():
            await self.store.bury(self.run_id, f"hook {token} entry {entry}", reason)
            await self.store.consumed(token, entry)
        self.cursors[token] = entry
        note(WARNING, "hook.rejected", self.run_id, "run %s: hook %r entry %s moved to the dead letters: %s",
             self.run_id, token, entry, reason)  # fmt: skip

    async def race(self, seq: int, awaitables: list[Awaitable[Any]]) -> tuple[int, Any]:
        """The first of `awaitables` to finish; the winner is recorded and replayed."""
        try:
            self.check(seq, "race")
        except NonDeterminismError:
            for awaitable in awaitables:  # never to be awaited: no "never awaited" warnings
                if isinstance(awaitable, Coroutine):
                    awaitable.close()
            raise
        index = self.replay.races.get(seq)
        if index is not None:
            for i, awaitable in enumerate(awaitables):
                if i != index and isinstance(awaitable, Coroutine):
                    awaitable.close()
            return index, await awaitables[index]
        ready = next((i for i, awaitable in enumerate(awaitables) if self._ends_from_log(awaitable)), None)
        if ready is not None:
            # The log has a racer's outcome but not the winner (the process died in between):
            # that racer wins, and no other starts, since a step would execute again only to lose.
            for i, awaitable in enumerate(awaitables):
                if i != ready and isinstance(awaitable, Coroutine):
                    awaitable.close()
            error: BaseException | None = None
            try:
                value = await awaitables[ready]
            except Exception as exc:
                value, error = None, exc
            await self.record(f"r{seq}", RaceWon(time.time(), seq, ready))
            self.replay.races[seq] = ready
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
        if error is not None:
            raise error
        return index, value

    def _ends_from_log(self, awaitable: Awaitable[Any]) -> bool:
        """Whether racer `awaitable` (a step, child, sleep or hook of this run, not started
        yet) ends from the log alone: its outcome is recorded, or its timer is due."""
        code = getattr(awaitable, "cr_code", None)
        frame = getattr(awaitable, "cr_frame", None)
        if code is None or frame is None:
            return False
        local = frame.f_locals
        if code is RunExecutor.run_step.__code__ or code is RunExecutor.run_child.__code__:
            return local["seq"] in self.replay.completed or local["seq"] in self.replay.failed
        if code is RunExecutor.sleep.__code__:
            due = self.replay.timers.get(local["seq"])
            return due is not None and due <= self.store.now()
        hook = local.get("self")
        if code.co_qualname == "Hook._next" and hook is not None:
            return (hook.seq, hook._received + 1) in self.replay.hooks
        return False

    # -- the whole run ------------------------------------------------------------------

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
            return await self._execute_run(args, kwargs)
        finally:
            if self.holding is not None:
                self.holding.stopped()  # after the run's state says so: its waiters read it next

    async def _execute_run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ok = False
        result: Any = None
        error: BaseException | None = None
        # Created here and closed below if their tasks never ran: a task cancelled
        # before its first step (a loop shutting down) never awaits what it wraps.
        helpers = (self._keep_lease(), self._watch())
        try:
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as body:
                    self._body = body
                    if self.cancel_reason is not None:
                        body.cancel()
                    for helper, name in zip(helpers, ("lease", "watch"), strict=True):
                        tg.start_soon(_given, helper, name=f"werkfluss {name} of run {self.run_id}")
                    token = enter_run(RunContext(self.run_id, self))
                    try:
                        result = await self.workflow.fn(*args, **kwargs)
                        ok = True
                    except _Suspend:
                        self.lost = True
                    except Exception as exc:
                        error = exc
                    except BaseExceptionGroup as group:
                        # A _Suspend raised in a task group (race(), the user's own) arrives
                        # wrapped; it must not escape as an error nobody can catch.
                        if group.subgroup(_Suspend) is not None and group.split(_UNWINDING)[1] is None:
                            self.lost = True
                        elif fails(group):
                            error = group
                        else:
                            raise
                    except BaseException as exc:
                        # sys.exit() in the body fails the run like an exception: in a worker
                        # it would otherwise kill the process and every run it executes.
                        if not fails(exc):
                            raise
                        error = exc
                    finally:
                        exit_run(token)
                self._closed = True
                await self._reap()
                tg.cancel_scope.cancel()
        except BaseException:
            # Ctrl-C or an outer cancellation: let a rerun take over at once.
            self._closed = True
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(1):
                    await self._reap()
                with anyio.move_on_after(2):
                    await self.store.release(self.run_id, self.epoch)
            raise
        finally:
            self._body = None
            for helper in helpers:
                if inspect.getcoroutinestate(helper) == inspect.CORO_CREATED:
                    helper.close()
        if self.lost:
            raise _Suspend(self.run_id, "another process took this run over")
        if isinstance(error, StorageError):
            # The server was out of reach longer than a write's retries: the run is
            # interrupted, not failed. Hand it back (if the server answers again) so
            # a rerun or another worker resumes it from its log.
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await self.store.release(self.run_id, self.epoch)
                except StorageError:
                    pass  # its lease runs out instead
            note(WARNING, "run.interrupted", self.run_id, "run %s interrupted: %s", self.run_id, error)
            raise error
        if self.diverged is not None:
            info = ErrorInfo.from_exception(self.diverged)
            await self._finish("blocked", RunBlocked(time.time(), info), "error", msgspec.msgpack.encode(info), None)
            note(WARNING, "run.blocked", self.run_id, "%s", self.diverged)
            raise self.diverged
        if ok:
            try:
                raw = encode_checked(result, owner=self.workflow.id, where="result", limit=self.settings.max_payload)
                # What an attach to the completed run will decode: the caller gets the same.
                value = convert_value(raw, self.workflow.return_type(), result, owner=self.workflow.id, where="result")
            except SerializationError as exc:
                error = exc
            else:
                await self._finish("completed", RunCompleted(time.time(), msgspec.Raw(raw)), "result", raw, None)
                note(INFO, "run.completed", self.run_id, "run %s (%s) completed", self.run_id, self.workflow.id)
                return value
        if error is None:
            if self.cancel_reason is not None:
                return await self.cancelled(self.cancel_reason)
            if self._paused is not None:
                return await self._park(self._paused)
            if self.stopping:
                await self.store.release(self.run_id, self.epoch)
                log.info("run %s handed back unfinished", self.run_id)
                return Released()
        if error is None:  # pragma: no cover - the body was cancelled from outside werkfluss
            error = RuntimeError("the workflow body was cancelled")
        seq = _failed_seq(error, self.run_id)
        info = ErrorInfo.from_exception(error)
        await self._finish("failed", RunFailed(time.time(), info, seq), "error", msgspec.msgpack.encode(info), seq)
        note(WARNING, "run.failed", self.run_id, "run %s (%s) failed: %s", self.run_id, self.workflow.id, info.type)
        raise error

    async def _reap(self) -> None:
        """Stop the tasks that still work for this execution after its body ended.

        `asyncio.gather` hands its caller the first child's cancellation without
        waiting for the other children, and on Python 3.11 `asyncio.wait_for`
        (redis-py sends through it) loses a cancellation that meets a finished
        send: a child of the body could go on, re-drive a child run (fencing out
        the execution the next replay started) or record after the run's end.
        """
        current = asyncio.current_task()
        deadline = time.monotonic() + self.lease
        while left := [task for task in self._tasks if task is not current and not task.done()]:
            if time.monotonic() > deadline:
                log.warning("run %s: %d tasks of its body ignore cancellation; leaving them", self.run_id, len(left))
                return
            for task in left:
                task.cancel()  # again each round: a cancellation may have been lost
            await asyncio.wait(left, timeout=0.05)

    async def cancelled(self, reason: str) -> Any:
        """Record the run as cancelled and raise `RunCancelledError`."""
        await self._finish("cancelled", RunCancelled(time.time(), reason), "cancel", reason.encode(), None)
        note(INFO, "run.cancelled", self.run_id, "run %s (%s) cancelled: %s", self.run_id, self.workflow.id,
             reason or "no reason given")  # fmt: skip
        raise RunCancelledError(self.run_id, reason)

    async def _finish(self, status: str, event: AnyEvent, field: str, value: bytes, seq: int | None) -> None:
        # A child driven by its parent's process needs no wake-up call: the
        # parent is awaiting it. One resumed on its own wakes its parent, and
        # first sets a later wake-up in case this process dies in between.
        if self.parent and not self.inline:
            await self.store.wake(self.parent, time.time() + self.lease)
        await self.store.finish(
            self.run_id, self.epoch, status=status, event=encode_event(event), field=field, value=value,
            failed_seq=seq, seen=self.events,
        )  # fmt: skip
        self.ended = True
        self._progressed()
        if self.replay.paused:  # only a run that paused can have a timer entry left
            await self.store.unschedule(self.run_id)
        if self.parent and not self.inline:
            await self.store.wake(self.parent)

    async def _park(self, waits: list[Waiting]) -> Any:
        """Record that the run waits for `waits`, and arrange to be woken."""
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
        if woken:
            await self.store.wake(self.run_id)
        else:
            await self.store.reschedule(self.run_id, min(dues) if dues else None)
        self.replay.paused = True
        note(INFO, "run.paused", self.run_id, "run %s (%s) paused, waiting for %s", self.run_id, self.workflow.id,
             describe(waits))  # fmt: skip
        return Paused(waits)

    async def _watch(self) -> None:
        """Pause the run once everything in it has been waiting for a moment
        (or hand it back, when stopping, once no step is executing)."""
        while True:
            await self._changed.wait()
            self._changed = anyio.Event()
            if self._active > self._held or (not self._waits and not self.stopping):
                continue
            generation = self._generation
            await anyio.sleep(_SETTLE)
            if generation != self._generation or self._active > self._held or self._body is None:
                continue
            if self._waits and not self._parked:  # a call held back must run elsewhere: hand back
                self._paused = list(self._waits.values())
            elif not self.stopping:
                continue
            self._body.cancel()
            return

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
            self._lose(f"lease not renewed for {time.monotonic() - renewed:.1f} s (the store is out of reach); "
                       "another process may take it over, stopping here")  # fmt: skip
            return

    def _lose(self, why: str) -> None:
        """The lease is lost: stop the body now; nothing new starts (`_checkpoint`)."""
        log.warning("run %s: %s", self.run_id, why)
        self.lost = True
        if self._body is not None:
            self._body.cancel()


class _Busy:
    """`RunExecutor.busy()`: a class, not a generator, since every step enters it twice
    (about 1 µs a step less than ``@contextmanager``)."""

    __slots__ = ("executor", "task", "track")

    def __init__(self, executor: RunExecutor, *, track: bool = True) -> None:
        self.executor = executor
        self.task: asyncio.Task[Any] | None = None
        self.track = track  # remember the task for `_reap` (costs a current_task() lookup)

    def __enter__(self) -> None:
        executor = self.executor
        if self.track:
            self.task = executor._enter()
        elif executor._closed:
            executor._enter()  # raises: nothing new starts for an execution that is over
        executor._active += 1
        executor._touch()

    def __exit__(self, *_: object) -> None:
        executor = self.executor
        executor._active -= 1
        executor._leave(self.task)
        executor._touch()


def fails(exc: BaseException) -> bool:
    """Whether a `BaseException` raised by user code (a step, a workflow body) is a failure
    of that code: all are (``sys.exit()`` too) but cancellation, a Ctrl-C, a generator
    closing, and the engine's own `_Suspend`."""
    if isinstance(exc, BaseExceptionGroup):
        return all(fails(inner) for inner in exc.exceptions)
    cancelled = anyio.get_cancelled_exc_class()
    return not isinstance(exc, (cancelled, KeyboardInterrupt, GeneratorExit, _Suspend))


def _given(coro: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None]:
    return coro


# What may accompany a _Suspend in an exception group of the body: the run is lost either way.
_UNWINDING = (_Suspend, Exception, asyncio.CancelledError)


async def wait_for_wake(store: RedisStore, run_id: str, lease: float, *, caller: bool = False) -> None:
    """Wait while run `run_id` is paused, until it or a child it waits for comes due.

    A due timer entry is taken (pushed `lease` ahead, so that it comes due
    again if this process dies) before returning: the caller resumes the run.
    Returns at once when the run is no longer paused. `caller`: the wait of
    ``start()`` itself, outside any run's body, where a Ctrl-C must not be lost.
    """
    delay = 0.02
    runs = await _wait_tree(store, run_id)
    while await store.status(run_id) == "paused":
        now = store.now()
        dues = await store.due(runs)
        for run, due in zip(runs, dues, strict=True):
            if due is not None and due <= now and await store.claim_timer(run, lease):
                return
        # Wake-ups by hooks arrive any time: look again soon, backing off; a timer is waited for exactly.
        soonest = min((due for due in dues if due is not None), default=None)
        if caller:
            _raise_lost_cancellation()
        await anyio.sleep(delay if soonest is None else min(delay, max(soonest - now, 0.001)))
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


async def _wait_tree(store: RedisStore, run_id: str) -> list[str]:
    """`run_id` and the paused child runs it waits for, transitively (bounded)."""
    runs = [run_id]
    for run in runs:
        if len(runs) >= 100:
            break
        raw = (await store.state(run)).get("waiting")
        try:
            waits = msgspec.msgpack.decode(raw, type=list[Waiting]) if raw else []
        except (msgspec.DecodeError, ValueError, RecursionError):
            waits = []
        runs.extend(w.run for w in waits if w.kind == "child" and w.run and w.run not in runs)
    return runs


def describe(waits: list[Waiting]) -> str:
    """``hook 'approve:7' or timer at 2026-11-21 12:00:00 UTC``, for logs and errors."""
    parts = []
    for wait in waits:
        if wait.kind == "hook":
            parts.append(f"hook {wait.token!r}")
        elif wait.kind == "timer" and wait.due is not None:
            parts.append("timer at " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wait.due)))
        else:
            parts.append(f"child run {wait.run!r}")
    return " or ".join(parts) or "nothing"


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
