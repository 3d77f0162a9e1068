"""Execute one run: take it over, replay its log, run live steps, record the end.

A live step costs one round trip: its start time and arguments travel in
the same script call as its result. Resuming reads the log in batches and
builds an index by sequence number, so a replayed step is a dict lookup and
nothing on the step path grows with the run's history.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ._context import RunContext, StepContext, enter_run, enter_step, exit_run, exit_step
from ._errors import (
    NonDeterminismError,
    RunConflictError,
    RunFailedError,
    SerializationError,
    StepFailedError,
    StorageError,
    _Suspend,
)
from ._events import (
    AnyEvent,
    ErrorInfo,
    RunBlocked,
    RunCompleted,
    RunFailed,
    RunResumed,
    RunStarted,
    StepCompleted,
    StepFailed,
    decode_event,
    decode_value,
    encode_call,
    encode_checked,
    encode_event,
)
from ._lease import holder_is_dead, process_holder

if TYPE_CHECKING:
    from ._store import AcquireResult, RedisStore
    from ._wrappers import Step, Workflow

__all__ = ["Replay", "RunExecutor", "run_workflow"]

log = logging.getLogger("werkfluss")


class Replay:
    """What a run's log says about its steps, indexed by sequence number."""

    __slots__ = ("attempts", "completed", "count", "failed", "steps")

    def __init__(self) -> None:
        self.completed: dict[int, StepCompleted] = {}
        self.failed: dict[int, StepFailed] = {}
        self.steps: dict[int, str] = {}
        self.attempts: dict[int, int] = {}
        self.count = 0

    @classmethod
    async def load(cls, store: RedisStore, run_id: str, retry_seq: int | None, retry_index: int) -> Replay:
        """Read run `run_id`'s log in batches.

        The final failure of `retry_seq` recorded up to `retry_index` is left
        out: that failure ended the run, and starting the run again means
        executing that step again.
        """
        replay = cls()
        async for batch in store.read_log(run_id):
            for index, body in batch:
                try:
                    if body is None:
                        raise ValueError("the entry has no event field")
                    event = decode_event(body)
                except (msgspec.DecodeError, ValueError, RecursionError) as exc:
                    raise StorageError(f"run {run_id!r}: log entry 0-{index} is malformed: {exc}") from None
                replay.add(index, event, retry_seq, retry_index)
        return replay

    def add(self, index: int, event: AnyEvent, retry_seq: int | None, retry_index: int) -> None:
        """Index one event."""
        self.count += 1
        if isinstance(event, StepCompleted):
            self.completed[event.seq] = event
            self.steps[event.seq] = event.step
            self.attempts[event.seq] = max(event.attempt, self.attempts.get(event.seq, 0))
        elif isinstance(event, StepFailed):
            self.steps[event.seq] = event.step
            self.attempts[event.seq] = max(event.attempt, self.attempts.get(event.seq, 0))
            if event.final and not (event.seq == retry_seq and index <= retry_index):
                self.failed[event.seq] = event


class RunExecutor:
    """Runs one workflow body for a run this process holds (epoch `epoch`)."""

    def __init__(
        self, store: RedisStore, workflow: Workflow[Any, Any], run_id: str, epoch: int, replay: Replay, lease: float
    ) -> None:
        self.store = store
        self.workflow = workflow
        self.run_id = run_id
        self.epoch = epoch
        self.replay = replay
        self.lease = lease
        self.lost = False
        self.diverged: NonDeterminismError | None = None

    # -- steps ------------------------------------------------------------------------

    async def run_step(self, step: Step[Any, Any], seq: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Return step `seq`'s recorded outcome, or execute it and record it."""
        if self.diverged is not None:
            raise self.diverged
        replay = self.replay
        recorded = replay.steps.get(seq)
        if recorded is not None and recorded != step.id:
            self.diverged = NonDeterminismError(self.run_id, seq, recorded, step.id)
            raise self.diverged
        done = replay.completed.get(seq)
        if done is not None:
            log.debug("run %s: step #%d %s replayed from the log", self.run_id, seq, step.id)
            return decode_value(done.result, step.return_type(), owner=step.id, where="result")
        failed = replay.failed.get(seq)
        if failed is not None:
            log.debug("run %s: step #%d %s replayed its recorded failure", self.run_id, seq, step.id)
            raise self._failure(step, seq, failed.attempt, failed.error, failed.error.rebuild())
        return await self._execute(step, seq, args, kwargs)

    async def _execute(self, step: Step[Any, Any], seq: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        args_raw = msgspec.Raw(encode_call(step.id, args, kwargs))  # before any side effect
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
                    if scope.cancelled_caught:
                        error = TimeoutError(f"step {step.id!r} timed out after {timeout:g} s")
            except Exception as exc:
                error = exc
            finally:
                exit_step(token)
            if error is None:
                try:
                    raw = encode_checked(result, owner=step.id, where="result")
                except SerializationError as exc:
                    # Retrying would return the same unstorable value: fail now.
                    await self._record_failure(step, seq, attempt, started, exc, final=True, retry_at=None)
                    raise
                event = StepCompleted(time.time(), seq, step.id, attempt, started, args_raw, msgspec.Raw(raw))
                await self.store.append_step(self.run_id, self.epoch, f"c{seq}", encode_event(event), self.lease)
                log.debug("run %s: step #%d %s executed (attempt %d)", self.run_id, seq, step.id, attempt)
                return result
            failures += 1
            retry = failures <= policy.retries and policy.retries_on(error)
            delay = policy.delay(failures) if retry else 0.0
            info = await self._record_failure(
                step, seq, attempt, started, error, final=not retry, retry_at=time.time() + delay if retry else None
            )
            if not retry:
                raise self._failure(step, seq, attempt, info, error) from error
            log.info(
                "run %s: step %s attempt %d failed (%s), retrying in %.3g s",
                self.run_id,
                step.id,
                attempt,
                type(error).__name__,
                delay,
            )
            await anyio.sleep(delay)

    async def _record_failure(
        self,
        step: Step[Any, Any],
        seq: int,
        attempt: int,
        started: float,
        error: BaseException,
        *,
        final: bool,
        retry_at: float | None,
    ) -> ErrorInfo:
        """Record a failed attempt; returns the error as recorded."""
        info = ErrorInfo.from_exception(error)
        event = StepFailed(time.time(), seq, step.id, attempt, started, info, final, retry_at)
        await self.store.append_step(self.run_id, self.epoch, f"f{seq}:{attempt}", encode_event(event), self.lease)
        return info

    def _failure(
        self, step: Step[Any, Any], seq: int, attempt: int, info: ErrorInfo, original: BaseException | None
    ) -> StepFailedError:
        return StepFailedError(
            run_id=self.run_id,
            step_id=step.id,
            seq=seq,
            attempts=attempt,
            error_type=info.type,
            error_message=info.message,
            traceback=info.traceback,
            original=original,
        )

    # -- the whole run ----------------------------------------------------------------

    async def execute(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the workflow body to its end and record that end.

        Raises:
            _Suspend: this process lost the run to another holder.
            NonDeterminismError: the run is parked as blocked.
            Exception: whatever the workflow raised; the run is failed.
        """
        ok = False
        result: Any = None
        error: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as body:
                    tg.start_soon(self._keep_lease, body)
                    token = enter_run(RunContext(self.run_id, self))
                    try:
                        result = await self.workflow.fn(*args, **kwargs)
                        ok = True
                    except _Suspend:
                        self.lost = True
                    except Exception as exc:
                        error = exc
                    finally:
                        exit_run(token)
                tg.cancel_scope.cancel()
        except BaseException:
            # Ctrl-C or an outer cancellation: let a rerun take over at once.
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self.store.release(self.run_id, self.epoch)
            raise
        if self.lost:
            raise _Suspend(self.run_id, "another process took this run over")
        if self.diverged is not None:
            info = ErrorInfo.from_exception(self.diverged)
            await self._finish("blocked", encode_event(RunBlocked(time.time(), info)), info, None)
            raise self.diverged
        if ok:
            try:
                raw = encode_checked(result, owner=self.workflow.id, where="result")
            except SerializationError as exc:
                error = exc
            else:
                event = RunCompleted(time.time(), msgspec.Raw(raw))
                await self.store.finish(
                    self.run_id, self.epoch, status="completed", event=encode_event(event), field="result",
                    value=raw, failed_seq=None,
                )  # fmt: skip
                log.info("run %s (%s) completed", self.run_id, self.workflow.id)
                return result
        assert error is not None
        seq = _failed_seq(error, self.run_id)
        info = ErrorInfo.from_exception(error)
        await self._finish("failed", encode_event(RunFailed(time.time(), info, seq)), info, seq)
        log.info("run %s (%s) failed: %s", self.run_id, self.workflow.id, type(error).__name__)
        raise error

    async def _finish(self, status: str, event: bytes, error: ErrorInfo, seq: int | None) -> None:
        await self.store.finish(
            self.run_id, self.epoch, status=status, event=event, field="error",
            value=msgspec.msgpack.encode(error), failed_seq=seq,
        )  # fmt: skip

    async def _keep_lease(self, body: anyio.CancelScope) -> None:
        """Renew the lease every third of it; stop the body if the run was taken over."""
        last_ok = time.monotonic()
        while True:
            await anyio.sleep(self.lease / 3)
            try:
                if await self.store.renew(self.run_id, self.epoch, self.lease):
                    last_ok = time.monotonic()
                    continue
            except StorageError as exc:
                if time.monotonic() - last_ok < self.lease:
                    log.warning("run %s: could not renew its lease, trying again: %s", self.run_id, exc)
                    continue
            log.warning("run %s: lease lost; another process may take it over, stopping here", self.run_id)
            self.lost = True
            body.cancel()
            return


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


async def run_workflow(
    store: RedisStore,
    workflow: Workflow[Any, Any],
    run_id: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    args_raw: bytes,
    lease: float,
) -> Any:
    """Attach to run `run_id` of `workflow`: return its result, resuming or starting it as needed."""
    holder = process_holder()
    digest = hashlib.sha256(args_raw).hexdigest()[:32]
    started = encode_event(RunStarted(time.time(), workflow.id, msgspec.Raw(args_raw)))
    take_over = ""
    while True:
        resumed = encode_event(RunResumed(time.time(), holder))
        got = await store.acquire(
            run_id, workflow=workflow.id, holder=holder, lease=lease, started=started, resumed=resumed,
            take_over=take_over, args_digest=digest,
        )  # fmt: skip
        if got.kind == "completed":
            log.info("run %s (%s) is complete: returning its recorded result", run_id, workflow.id)
            return decode_value(got.result, workflow.return_type(), owner=workflow.id, where="result")
        if got.kind == "conflict":
            raise RunConflictError(
                f"run {run_id!r} belongs to workflow {got.workflow!r}, not {workflow.id!r}; choose another run_id"
            )
        if got.kind == "other-arguments":
            raise RunConflictError(
                f"run {run_id!r} was started with other arguments; a run ID names one call, so use "
                f"another run_id for these arguments"
            )
        if got.kind == "busy":
            take_over = await _wait_for_holder(store, run_id, got)
            if take_over == "completed":
                take_over = ""
            continue
        replay = Replay()
        if got.kind == "resumed":
            replay = await Replay.load(store, run_id, got.retry_seq, got.retry_index)
            log.info(
                "run %s (%s) resumed %s: %d events in the log",
                run_id,
                workflow.id,
                _RESUMED_AFTER.get(got.previous, f"from {got.previous}"),
                replay.count,
            )
        else:
            log.info("run %s (%s) started", run_id, workflow.id)
        executor = RunExecutor(store, workflow, run_id, got.epoch, replay, lease)
        try:
            return await executor.execute(args, kwargs)
        except _Suspend:
            log.info("run %s was taken over by another process; waiting for its result", run_id)
            take_over = ""


_RESUMED_AFTER = {"running": "after an interruption", "failed": "after a failure", "blocked": "after a code change"}


async def _wait_for_holder(store: RedisStore, run_id: str, busy: AcquireResult) -> str:
    """Wait while another live process holds the run.

    Returns the holder to take over (a process on this host that is gone),
    ``""`` to try acquiring again (lease expired or released), or
    ``"completed"`` when the run completed meanwhile.

    Raises:
        RunFailedError: the run ended failed or blocked while we waited.
    """
    if holder_is_dead(busy.holder):
        log.info("run %s: its holder %s is gone; taking over", run_id, busy.holder)
        return busy.holder
    deadline = time.monotonic() + max(busy.lease_left, 0.0) + 0.05
    delay = 0.01
    while True:
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.25)
        state = await store.state(run_id)
        status = state.get("status", b"").decode()
        if status == "completed":
            return "completed"
        if status in ("failed", "blocked"):
            info = _error_info(state.get("error", b""))
            raise RunFailedError(run_id, info.type, info.message, info.traceback)
        holder = state.get("holder", b"").decode()
        if status != "running" or not holder:
            return ""
        if holder != busy.holder:
            return holder if holder_is_dead(holder) else ""
        if time.monotonic() >= deadline:
            return ""


def _error_info(raw: bytes) -> ErrorInfo:
    try:
        return msgspec.msgpack.decode(raw, type=ErrorInfo)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return ErrorInfo(type="werkfluss.UnknownError", message="the recorded error could not be decoded")
