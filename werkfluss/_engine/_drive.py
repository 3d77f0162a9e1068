"""Drive a run from the caller's process: take it over, execute, wait while it pauses.

`drive` is what `start()` does for its own run and what a parent does for
a child run (`drive_child`, the executor's `ChildDriver`), each described by
one `RunCall`. It attaches through `_attach`, as a worker does, and adds what
a caller does beyond that: it waits while another live caller holds the run,
and while the run pauses.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import RunConflictError, RunFailedError, StorageError, _Suspend
from .._events import error_info
from .._holder import holder_is_dead, live_holding
from .._holder import holding as new_holding
from .._logging import log, note
from .._values import decode_value
from ._attach import Attached, args_digest, attach, resumed_from
from ._executor import Paused, RunExecutor, wait_for_wake
from ._run_deadline import cancelled_error

if TYPE_CHECKING:
    from .._holder import Holding
    from .._store import AcquireResult, Store
    from ._call import RunCall

__all__ = ["args_digest", "drive", "drive_child", "resumed_from"]


async def drive(call: RunCall, *, wait: bool = True, holding: Holding | None = None) -> Any:
    """Attach to the run `call` names and bring it to its end.

    Starts the run if it does not exist; a completed run returns its
    recorded result; an interrupted, paused, failed or blocked one resumes.
    A run held by another live process is waited for. When the run pauses,
    this waits for its wake-up and resumes it (`wait`), or returns `Paused`
    (a parent driving a child).

    Raises:
        RunConflictError: the run ID names another workflow's run or other arguments.
        RunCancelledError: the run was cancelled (`RunTimeoutError`: its deadline passed).
        RunFailedError: the run failed in another process while this one waited.
        SerializationError: the run's log does not decode.
        Exception: what the workflow raised (the run is recorded failed).
    """
    if holding is None:
        # A holder name of this call's own: another caller in this process (a task, a
        # thread, a worker) then finds the run busy and waits, instead of taking it over.
        with new_holding(call.run_id) as held:
            return await drive(call, wait=wait, holding=held)
    store, run_id = call.store, call.run_id
    take_over = ""
    while True:
        attached = await attach(store, run_id, holding, call.settings, drive_child, call=call, take_over=take_over)
        take_over = ""
        if attached.kind == "busy":
            take_over = await _wait_for_holder(store, run_id, attached.got)
            continue
        if attached.kind == "completed":
            workflow = call.workflow
            message = "run %s (%s) is complete: returning its recorded result"
            note(INFO, "run.recorded", run_id, message, run_id, workflow.id)
            return decode_value(attached.got.result, workflow.return_type(), owner=workflow.id, where="result")
        executor = attached.executor
        if executor is None:
            raise _refusal(call, attached)
        try:
            outcome = await executor.execute(attached.args, attached.kwargs)
        except _Suspend:
            log.info("run %s was taken over by another process; waiting for its result", run_id)
            continue
        except Exception:
            if attached.watchdog:
                await _disarm(store, executor)
            raise
        if attached.watchdog:
            await _disarm(store, executor)
        if not isinstance(outcome, Paused) or not wait:
            return outcome
        await wait_for_wake(store, run_id, call.settings.lease, caller=True)


def _refusal(call: RunCall, attached: Attached) -> Exception:
    """Why the run `call` attached to is not this call's to execute."""
    got, run_id, workflow = attached.got, call.run_id, call.workflow
    if attached.error is not None:
        return attached.error
    if got.kind == "cancelled":
        return cancelled_error(run_id, got.cancel or "")
    if got.kind == "conflict":
        return RunConflictError(
            run_id, f"run {run_id!r} belongs to workflow {got.workflow!r}, not {workflow.id!r}; choose another run_id"
        )
    if got.kind == "other-arguments":
        return RunConflictError(
            run_id,
            f"run {run_id!r} was started with other arguments; a run ID names one call, so use "
            f"another run_id for these arguments",
        )
    # Missing and ended: a call creates a missing run and resumes a failed one (retry).
    return StorageError(f"run {run_id!r}: the store answered {got.kind!r} to a start")


async def drive_child(call: RunCall) -> Any:
    """`drive` a child run for its parent: returns its result, or `Paused` when it pauses."""
    return await drive(call, wait=False)


async def _disarm(store: Store, executor: RunExecutor) -> None:
    """Remove the watchdog wake-up of a run that ended here.

    A run that paused replaced it with its own wake-up (or removed it), and the
    end of a run that had paused removes the entry itself. A wake-up left behind
    would only cost a worker a look at an ended run, but without workers it would
    stay in the timer set for good.
    """
    if not executor.ended or executor.replay.paused:
        return
    try:
        await store.unschedule(executor.run_id, queue=executor.queue)
    except StorageError as exc:
        log.info("run %s: could not remove its watchdog wake-up: %s", executor.run_id, exc)


async def _wait_for_holder(store: Store, run_id: str, busy: AcquireResult) -> str:
    """Wait while another live caller holds the run, here or in another process.

    Returns the holder to take over (a caller on this host that is gone),
    or ``""`` to try acquiring again (lease expired, released, paused or ended).
    A holder in this process is never taken over while it lives, even past
    its lease: it is provably alive, and this process must not fence itself.
    It wakes its waiters when it stops executing, so they learn at once.

    Raises:
        RunFailedError: the run ended failed or blocked while we waited.
        RunCancelledError: the run was cancelled while we waited.
    """
    if holder_is_dead(busy.holder):
        log.info("run %s: its holder %s is gone; taking over", run_id, busy.holder)
        return busy.holder
    here = live_holding(busy.holder)
    generation = here.generation if here is not None else 0
    if here is not None:
        log.info("run %s is executing in this process (holder %s); waiting for it", run_id, busy.holder)
    deadline = time.monotonic() + max(busy.lease_left, 0.0) + 0.05
    delay = 0.01
    while True:
        if here is not None:
            await here.wait(generation, delay)
            # Read before the state: a stop after the read below wakes the next wait.
            generation = here.generation
            delay = min(delay * 2, 1.0)
        else:
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.25)
        state = await store.state(run_id)
        status = state.status
        if status in ("failed", "blocked"):
            info = error_info(state.error or b"")
            raise RunFailedError(run_id, info.type, info.message, info.traceback)
        if status == "cancelled":
            raise cancelled_error(run_id, state.cancel or "")
        holder = state.holder
        if status != "running" or not holder:
            return ""
        if holder != busy.holder:
            return holder if holder_is_dead(holder) else ""
        if here is not None:
            if holder_is_dead(holder):
                return holder  # it ended here without handing the run back (its release failed)
        elif time.monotonic() >= deadline:
            return ""
