"""Steps and child runs of a run's body: replayed from the log, or executed and recorded.

A live step costs one round trip: its start time and arguments travel in
the same script call as its result (`RunBase.record`). A replayed one is
a dict lookup in the `Replay` index.
"""

from __future__ import annotations

import time
from logging import DEBUG, INFO, WARNING
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from .._context import StepContext, enter_step, exit_step
from .._errors import NonDeterminismError, SerializationError, StepFailedError, _Suspend
from .._events import ErrorInfo, StepCompleted, StepFailed, Waiting
from .._values import call_digest, convert_value, decode_value, encode_call, encode_checked, encode_run_call
from ._call import RunCall
from ._pause import Busy, Paused, wait_for_wake
from ._run import RunBase

if TYPE_CHECKING:
    from .._context import StepLike, WorkflowLike

__all__ = ["StepCalls", "fails"]


class StepCalls(RunBase):
    """What a run's body calls that has a result: steps and child workflows."""

    async def run_step(self, step: StepLike, seq: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Return step `seq`'s recorded outcome, or execute it and record it."""
        self.check(seq, step.id)
        done = self.replay.completed.get(seq)
        if done is not None:
            if done.digest is not None and step.options.check_args:
                self.check_args(seq, step.id, done.digest, done.args, args, kwargs)
            self._note_step(DEBUG, "step.replayed", seq, step.id, "replayed from the log")
            return decode_value(done.result, step.return_type(), owner=step.id, where="result")
        failed = self.replay.failed.get(seq)
        if failed is not None:
            if step.options.check_args:
                self.check_args(seq, step.id, failed.digest, None, args, kwargs)
            self._note_step(DEBUG, "step.replayed", seq, step.id, "replayed its recorded failure")
            raise self._failure(step.id, seq, failed.attempt, failed.error, failed.error.rebuild())
        if not self.live:
            return await self._history_ends(seq)
        await self._checkpoint()
        with Busy(self._activity):
            return await self._execute(step, seq, args, kwargs)

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
                    info = await self._record_failure(step.id, seq, attempt, started, exc, digest=digest)
                    self._note_step(WARNING, "step.failed", seq, step.id, "returned an unfit result: %s", exc)
                    raise self._failure(step.id, seq, attempt, info, exc) from exc
                event = StepCompleted(time.time(), seq, step.id, attempt, started, args_raw, msgspec.Raw(raw), digest)
                await self.record(f"c{seq}", event)
                self._note_step(DEBUG, "step.executed", seq, step.id, "executed (attempt %d)", attempt)
                return value
            failures += 1
            retry = failures <= policy.retries and policy.retries_on(error)
            delay = policy.delay(failures) if retry else 0.0
            retry_at = time.time() + delay if retry else None
            info = await self._record_failure(step.id, seq, attempt, started, error, retry_at=retry_at, digest=digest)
            if not retry:
                message = "failed after %d attempt(s): %s"
                self._note_step(WARNING, "step.failed", seq, step.id, message, attempt, info.type)
                raise self._failure(step.id, seq, attempt, info, error) from error
            message = "attempt %d failed (%s), retrying in %.3g s"
            self._note_step(INFO, "step.retrying", seq, step.id, message, attempt, info.type, delay)
            await anyio.sleep(delay)
            await self._checkpoint(held=True)

    async def _record_failure(
        self,
        step_id: str,
        seq: int,
        attempt: int,
        started: float,
        error: BaseException,
        *,
        retry_at: float | None = None,
        digest: bytes | None,
    ) -> ErrorInfo:
        """Record a failed attempt, final unless it is retried at `retry_at`; returns the error as recorded."""
        info = ErrorInfo.from_exception(error)
        final = retry_at is None
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
        if not self.live:
            return await self._history_ends(seq)
        await self._checkpoint()
        encoded = encode_run_call(workflow.id, args, kwargs, limit=self.settings.max_payload)
        digest = call_digest(args, kwargs)
        started = time.time()
        call = RunCall(
            store=self.store,
            workflow=workflow,
            run_id=child_id,
            args=args,
            kwargs=kwargs,
            encoded=encoded,
            settings=self.settings,
            parent=self.run_id,
            queue=workflow.queue_tag(child_id),
            deadline=workflow.deadline,
        )
        self.driving.add(child_id)
        while True:
            try:
                with Busy(self._activity):
                    outcome = await self.drive_child(call)
            except (_Suspend, NonDeterminismError):
                raise
            except Exception as exc:
                self.driving.discard(child_id)
                attempt = self.replay.attempts.get(seq, 0) + 1
                info = await self._record_failure(workflow.id, seq, attempt, started, exc, digest=digest)
                raise self._failure(workflow.id, seq, attempt, info, exc) from exc
            if not isinstance(outcome, Paused):
                break
            with self._activity.waiting(Waiting("child", run=child_id)):
                await wait_for_wake(self.store, child_id, self.lease)
        self.driving.discard(child_id)
        raw = encode_checked(outcome, owner=workflow.id, where="result", limit=self.settings.max_payload)
        attempt = self.replay.attempts.get(seq, 0) + 1
        event = StepCompleted(
            time.time(), seq, workflow.id, attempt, started, msgspec.Raw(encoded[0]), msgspec.Raw(raw), digest
        )
        await self.record(f"c{seq}", event)
        return outcome


def fails(exc: BaseException) -> bool:
    """Whether a `BaseException` raised by user code (a step, a workflow body) is a failure
    of that code: all are (``sys.exit()`` too) but cancellation, a Ctrl-C, a generator
    closing, and the engine's own `_Suspend`."""
    if isinstance(exc, BaseExceptionGroup):
        return all(fails(inner) for inner in exc.exceptions)
    cancelled = anyio.get_cancelled_exc_class()
    return not isinstance(exc, (cancelled, KeyboardInterrupt, GeneratorExit, _Suspend))
