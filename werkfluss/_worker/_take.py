"""What a worker does with the run a queue message names: take it over and execute it.

`take` attaches to the run through the engine (`_engine._attach`, the path
`start()` takes too), executes it, and says what becomes of the message:

- ``"ack"``: the run's progress is in the log (it ended or paused), or there
  was nothing to do (it completed, was cancelled, or a live holder has it);
- ``"requeue"``: the run was handed back unfinished (the worker is stopping);
- ``"keep"``: left pending, for another delivery (or another worker) to try;
- ``"declined"``: kept, and left to workers that define the run's workflow;
- ``"done"``: already dealt with (dead-lettered).

`fail_buried` marks failed the run of a message that went to the dead letters.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

from .._engine._attach import acquire, attach
from .._engine._drive import drive_child
from .._engine._executor import Released, RunExecutor, fails
from .._errors import ConfigurationError
from .._events import ErrorInfo
from .._holder import holding
from .._ids import check_run_id, registered_workflow
from .._logging import log
from .._store._keys import GROUP

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._options import Settings
    from .._store import Store

__all__ = ["GROUP", "Outcome", "dead", "fail_buried", "take"]


Outcome = Literal["ack", "requeue", "keep", "declined", "done"]


async def take(
    store: Store,
    settings: Settings,
    worker: str,
    message: str,
    fields: dict[str, str],
    executing: Callable[[RunExecutor], None],
) -> Outcome:
    """Take over the run `message` names and execute it; returns what becomes of the message.

    `executing` is handed the run's executor before the body starts (the
    worker stops it on a shutdown and renews the message meanwhile).
    """
    run_id = fields.get("r", "")
    try:
        check_run_id(run_id)
    except ConfigurationError:
        return await dead(store, worker, message, run_id, f"malformed message: no valid run ID in {sorted(fields)}")
    # A holder name per execution: when this process executes the run already (a
    # wake-up arrived meanwhile, or a start() here holds it), the run is busy.
    with holding(run_id) as held:
        attached = await attach(
            store,
            run_id,
            held,
            settings,
            drive_child,
            workflows=registered_workflow,
            retry=fields.get("x") == "1",
            worker=worker,
        )
        got = attached.got
        if attached.kind == "missing":
            return await dead(store, worker, message, run_id, f"there is no run {run_id!r}")
        if attached.kind == "busy":
            # Its holder is alive and will finish it; look again when its lease would run out
            # (a holder in this process may be past its lease: then in a moment). The run
            # itself sees hooks and timers as it goes.
            await store.wake(run_id, time.time() + (got.lease_left + 0.1 if got.lease_left > 0 else 1.0))
            return "ack"
        if attached.kind == "undefined":
            await store.release(run_id, got.epoch, pending=True)  # for a worker that defines it
            await store.note_error(message, f"workflow {got.workflow!r} is not defined in worker {worker}")
            log.warning(
                "worker %s: run %s needs workflow %r, which this worker does not define; leaving it",
                worker,
                run_id,
                got.workflow,
            )
            return "declined"
        if attached.error is not None:
            # A log that does not decode will not decode next time either: the run fails.
            error = ErrorInfo(type="werkfluss.SerializationError", message=str(attached.error))
            await store.fail(run_id, got.epoch, error)
            return await dead(store, worker, message, run_id, str(attached.error))
        executor = attached.executor
        if executor is None:
            return "ack"  # completed, cancelled, or failed/blocked without a retry: nothing to do
        executing(executor)
        try:
            outcome = await executor.execute(attached.args, attached.kwargs)
        except BaseException as exc:
            if executor.ended and fails(exc):
                return "ack"  # failed, blocked or cancelled, and recorded so
            raise
        return "requeue" if isinstance(outcome, Released) else "ack"  # ended or paused


async def fail_buried(store: Store, settings: Settings, worker: str, run_id: str, reason: str) -> None:
    """Mark the run of a message that went to the dead letters as failed, with the reason.

    Its message was delivered too often without finishing (a step that kills
    its worker, say): left as it was, the run would look forever in progress.
    It is taken over first, so a holder that is still alive is fenced out.
    """
    log.error("worker %s: run %s went to the dead letters: %s", worker, run_id, reason)
    try:
        check_run_id(run_id)
    except ConfigurationError:
        return
    with holding(run_id) as held:
        got = await acquire(store, run_id, held, settings.lease, retry=False)
        if got.kind == "resumed":  # else ended meanwhile, or a live holder renews it: leave it be
            await store.fail(run_id, got.epoch, ErrorInfo(type="werkfluss.DeadLetter", message=reason))


async def dead(store: Store, worker: str, message: str, run_id: str, reason: str) -> Outcome:
    """Move `message` to the dead letters with `reason`."""
    log.error("worker %s: dead-lettering message %s (run %r): %s", worker, message, run_id, reason)
    await store.dead_letter(GROUP, message, run_id, reason)
    return "done"
