"""Cancel a run from any process, and the child runs it waits for.

`cancel()` calls this for a user; a race calls it for a child run that lost
(the losers of a race are cancelled, a child run as much as a step).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .._errors import RunNotFoundError
from .._events import RunCancelled, decode_waits, encode_event
from .._holder import live_holding
from ._run_deadline import is_deadline_reason

if TYPE_CHECKING:
    from .._holder import Holding
    from .._store import Store

__all__ = ["cancel_run", "child_reason"]

# How deep a cancel follows child runs: deeper trees are cancelled by their own
# runs' next step (a cancelled parent's child finds it when it wakes the parent).
_MAX_DEPTH = 20


async def cancel_run(store: Store, run_id: str, reason: str, *, depth: int = 0, gone: str = "") -> bool:
    """Cancel run `run_id` and the child runs it is waiting for.

    Returns False when the run had already completed or been cancelled.
    `gone` names a holder known to be gone (a process that died): the run
    is cancelled at once instead of waiting for that holder to act.

    Raises:
        RunNotFoundError: there is no run `run_id`.
    """
    state = await store.state(run_id)
    waiting = state.waiting
    outcome, parent = await store.cancel(run_id, reason, encode_event(RunCancelled(time.time(), reason)), gone=gone)
    if outcome == "missing":
        raise RunNotFoundError(run_id)
    if outcome == "requested":
        # Its holder may be a caller in this process, on any thread: stop it at once
        # instead of at its next lease renewal.
        here = live_holding(state.holder)
        if here is not None and here.run_id == run_id:
            here.call(lambda: _stop_here(here, reason))
    elif outcome == "cancelled":
        await store.unschedule(run_id, queue=state.queue)
        await store.forget_waiting(run_id, queue=state.queue)
        if parent:
            await store.wake(parent, queue=await store.queue_of(parent))
    if waiting and depth < _MAX_DEPTH:
        for wait in decode_waits(waiting) or []:
            if wait.kind == "child" and wait.run:
                await cancel_run(store, wait.run, child_reason(run_id, reason), depth=depth + 1)
    return outcome in ("cancelled", "requested")


def child_reason(run_id: str, reason: str) -> str:
    """The reason a child run of `run_id` is cancelled with, when `run_id` is cancelled for `reason`."""
    if is_deadline_reason(reason):
        # The child did not time out itself: its callers get a RunCancelledError, not a RunTimeoutError.
        return f"parent run {run_id!r} timed out: {reason}"
    return reason or f"parent run {run_id!r} was cancelled"


def _stop_here(holding: Holding, reason: str) -> None:
    executor = holding.executor
    if executor is not None:
        executor.request_cancel(reason)
