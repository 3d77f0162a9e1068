"""What a worker does with the run a queue message names: take it over and execute it.

`take` attaches to the run through the engine (`_engine._attach`, the path
`start()` takes too), executes it, and says what becomes of the message:

- ``"ack"``: the run's progress is in the log (it paused), or there was
  nothing to do now (a live holder has it; a run of another queue, which
  goes there instead);
- ``"ended"``: acknowledged too, and the run has ended (here, or before:
  completed, failed, cancelled): its queue forgets its key and deduplication ID;
- ``"requeue"``: the run was handed back unfinished (the worker is stopping);
- ``"keep"``: left pending, for another delivery (or another worker) to try;
- ``"declined"``: kept, and left to workers that define the run's workflow;
- ``"done"``: already dealt with (dead-lettered).

`fail_buried` marks failed the run of a message that went to the dead letters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .._engine._attach import acquire, attach
from .._engine._drive import drive_child
from .._engine._executor import Released, RunExecutor, fails
from .._errors import ConfigurationError, NonDeterminismError
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


Outcome = Literal["ack", "ended", "requeue", "keep", "declined", "done"]


async def take(
    store: Store,
    settings: Settings,
    worker: str,
    message: tuple[str, str],
    fields: dict[str, str],
    executing: Callable[[RunExecutor], None],
) -> Outcome:
    """Take over the run `message` (its queue partition's tag, its ID) names and execute
    it; returns what becomes of the message.

    `executing` is handed the run's executor before the body starts (the
    worker stops it on a shutdown and renews the message meanwhile).
    """
    run_id = fields.get("r", "")
    tag = message[0]
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
            route=tag,
        )
        got = attached.got
        if attached.kind == "missing":
            return await dead(store, worker, message, run_id, f"there is no run {run_id!r}")
        if attached.kind == "elsewhere":
            # A wake-up that reached another queue than the run's (sent by an older version,
            # or by a sweep): the run's own queue gets it, its limits apply there.
            await store.enqueue(run_id, retry=fields.get("x") == "1", queue=got.queue)
            return "ack"
        if attached.kind == "busy":
            # Its holder is alive and will finish it; look again when its lease would run out
            # (a holder in this process may be past its lease: then in a moment). The run
            # itself sees hooks and timers as it goes.
            after = got.lease_left + 0.1 if got.lease_left > 0 else 1.0
            await store.wake(run_id, after, queue=got.queue or tag)
            return "ack"
        if attached.kind == "undefined":
            await store.release(run_id, got.epoch, pending=True)  # for a worker that defines it
            missing = f"workflow {got.workflow!r} is not defined in worker {worker}"
            await store.note_error(message[1], missing, queue=tag)
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
            # Completed, cancelled, or failed/blocked without a retry: nothing to do.
            return "ack" if attached.kind in ("ended", "conflict", "other-arguments") else "ended"
        executing(executor)
        try:
            outcome = await executor.execute(attached.args, attached.kwargs)
        except BaseException as exc:
            if executor.ended and fails(exc):
                # Failed or cancelled, and recorded so (blocked waits for a deploy: not ended).
                return "ack" if isinstance(exc, NonDeterminismError) else "ended"
            raise
        if isinstance(outcome, Released):
            return "requeue"
        return "ended" if executor.ended else "ack"  # ended or paused


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


async def dead(store: Store, worker: str, message: tuple[str, str], run_id: str, reason: str) -> Outcome:
    """Move `message` (its tag, its ID) to the dead letters with `reason`."""
    log.error("worker %s: dead-lettering message %s (run %r): %s", worker, message[1], run_id, reason)
    await store.dead_letter(GROUP, message[1], run_id, reason, queue=message[0])
    return "done"
